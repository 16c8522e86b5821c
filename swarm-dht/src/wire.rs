//! Reading and writing the inference protocol's messages on a stream: a
//! 4-byte little-endian length and a bincode control message, optionally
//! followed by one tensor frame. Lengths and frame sizes are checked
//! against caps before anything is allocated for them.

use bincode::{Decode, Encode};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use swarm_core::codec::{self, MAX_CONTROL_MESSAGE};
use swarm_core::tensor_frame::{self, FrameHeader, WireDType, HEADER_LEN};

use crate::error::DhtError;

fn io(what: &'static str) -> impl Fn(std::io::Error) -> DhtError {
    move |e| DhtError::StreamLost(format!("{what}: {e}"))
}

/// Writes `message`, then `frame` (an encoded tensor frame) if given, and
/// flushes.
pub async fn write_message<W, M>(
    stream: &mut W,
    message: &M,
    frame: Option<&[u8]>,
) -> Result<(), DhtError>
where
    W: AsyncWrite + Unpin,
    M: Encode,
{
    let body = codec::encode(message)?;
    let mut out = Vec::with_capacity(4 + body.len() + frame.map_or(0, <[u8]>::len));
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    if let Some(frame) = frame {
        out.extend_from_slice(frame);
    }
    stream.write_all(&out).await.map_err(io("sending"))?;
    stream.flush().await.map_err(io("sending"))
}

/// Writes `message`, then `values` of shape `dims` as a tensor frame of
/// `dtype`, and flushes: [`write_message`] with the frame encoded straight
/// into the outgoing buffer.
pub async fn write_tensor_message<W, M>(
    stream: &mut W,
    message: &M,
    values: &[f32],
    dims: &[usize],
    dtype: WireDType,
) -> Result<(), DhtError>
where
    W: AsyncWrite + Unpin,
    M: Encode,
{
    let body = codec::encode(message)?;
    let payload = values.len() * dtype.size();
    let mut out = Vec::with_capacity(4 + body.len() + HEADER_LEN + payload);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    tensor_frame::encode_into(values, dims, dtype, &mut out)?;
    stream.write_all(&out).await.map_err(io("sending"))?;
    stream.flush().await.map_err(io("sending"))
}

/// Reads one control message. `Ok(None)` when the stream ended cleanly
/// before it.
pub async fn read_message<R, M>(stream: &mut R) -> Result<Option<M>, DhtError>
where
    R: AsyncRead + Unpin,
    M: Decode<()>,
{
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = stream
            .read(&mut len[got..])
            .await
            .map_err(io("receiving"))?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(DhtError::StreamLost(
                    "the stream ended inside a message".into(),
                ))
            };
        }
        got += n;
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_CONTROL_MESSAGE {
        return Err(DhtError::Core(swarm_core::CoreError::MessageTooLarge {
            size: len,
            limit: MAX_CONTROL_MESSAGE,
        }));
    }
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .await
        .map_err(io("receiving"))?;
    Ok(Some(codec::decode(&body)?))
}

/// Reads one tensor frame of at most `max_elements` values and returns its
/// shape and values as f32.
pub async fn read_frame<R>(
    stream: &mut R,
    max_elements: usize,
) -> Result<(Vec<usize>, Vec<f32>), DhtError>
where
    R: AsyncRead + Unpin,
{
    let mut head = [0u8; HEADER_LEN];
    stream
        .read_exact(&mut head)
        .await
        .map_err(io("receiving a frame"))?;
    let header = FrameHeader::parse(&head, max_elements)?;
    // f32 on a little-endian machine is the wire's own layout: read the
    // payload straight into the values.
    #[cfg(target_endian = "little")]
    if header.dtype == WireDType::F32 {
        let mut values = vec![0f32; header.elements()];
        stream
            .read_exact(bytemuck::cast_slice_mut(&mut values))
            .await
            .map_err(io("receiving a frame"))?;
        return Ok((header.dims, values));
    }
    let mut bytes = Vec::with_capacity(HEADER_LEN + header.payload_len());
    bytes.extend_from_slice(&head);
    bytes.resize(HEADER_LEN + header.payload_len(), 0);
    stream
        .read_exact(&mut bytes[HEADER_LEN..])
        .await
        .map_err(io("receiving a frame"))?;
    Ok(tensor_frame::decode(&bytes, max_elements)?)
}

/// Encodes `values` of shape `dims` as a frame of `dtype`.
pub fn frame(values: &[f32], dims: &[usize], dtype: WireDType) -> Result<Vec<u8>, DhtError> {
    Ok(tensor_frame::encode(values, dims, dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use futures::io::Cursor;
    use swarm_core::infer::{Request, Response};

    #[test]
    fn messages_and_frames_round_trip() {
        block_on(async {
            let mut pipe = Cursor::new(Vec::new());
            let values: Vec<f32> = (0..2 * 8).map(|i| i as f32 * 0.25).collect();
            let f = frame(&values, &[1, 2, 8], WireDType::F32).unwrap();
            let step = Request::Step {
                start: 3,
                positions: 2,
            };
            write_message(&mut pipe, &step, Some(&f)).await.unwrap();
            write_message(&mut pipe, &Response::Truncated, None)
                .await
                .unwrap();
            let mut pipe = Cursor::new(pipe.into_inner());
            assert_eq!(
                read_message::<_, Request>(&mut pipe).await.unwrap(),
                Some(step)
            );
            let (dims, got) = read_frame(&mut pipe, 1024).await.unwrap();
            assert_eq!((dims, got), (vec![1, 2, 8], values));
            assert_eq!(
                read_message::<_, Response>(&mut pipe).await.unwrap(),
                Some(Response::Truncated)
            );
            assert_eq!(read_message::<_, Response>(&mut pipe).await.unwrap(), None);
        });
    }

    #[test]
    fn tensor_messages_carry_f32_exactly_and_f16_rounded() {
        block_on(async {
            let values: Vec<f32> = (0..3 * 4).map(|i| i as f32 / 3.0 - 1.5).collect();
            let mut pipe = Cursor::new(Vec::new());
            for dtype in [WireDType::F32, WireDType::F16] {
                let message = Response::Stepped { positions: 3 };
                write_tensor_message(&mut pipe, &message, &values, &[1, 3, 4], dtype)
                    .await
                    .unwrap();
            }
            let mut pipe = Cursor::new(pipe.into_inner());
            for dtype in [WireDType::F32, WireDType::F16] {
                assert_eq!(
                    read_message::<_, Response>(&mut pipe).await.unwrap(),
                    Some(Response::Stepped { positions: 3 })
                );
                let (dims, got) = read_frame(&mut pipe, 12).await.unwrap();
                assert_eq!(dims, [1, 3, 4]);
                for (a, b) in values.iter().zip(&got) {
                    match dtype {
                        WireDType::F32 => assert_eq!(a, b),
                        WireDType::F16 => assert!((a - b).abs() < 1e-3, "{a} vs {b}"),
                    }
                }
            }
            // A frame over the reader's cap is refused before its payload.
            let mut pipe = Cursor::new(Vec::new());
            let message = Response::Stepped { positions: 3 };
            write_tensor_message(&mut pipe, &message, &values, &[1, 3, 4], WireDType::F32)
                .await
                .unwrap();
            let mut pipe = Cursor::new(pipe.into_inner());
            read_message::<_, Response>(&mut pipe).await.unwrap();
            assert!(read_frame(&mut pipe, 11).await.is_err());
        });
    }

    #[test]
    fn oversized_and_truncated_input_is_refused_before_allocating() {
        block_on(async {
            // A 4 GiB length prefix.
            let mut pipe = Cursor::new(u32::MAX.to_le_bytes().to_vec());
            let err = read_message::<_, Request>(&mut pipe).await.unwrap_err();
            assert!(err.to_string().contains("exceeds"), "{err}");
            // A frame larger than the cap.
            let big = frame(&vec![0.0; 4096], &[1, 4, 1024], WireDType::F16).unwrap();
            let err = read_frame(&mut Cursor::new(big.clone()), 1024)
                .await
                .unwrap_err();
            assert!(err.to_string().contains("elements"), "{err}");
            // A frame cut short, and a message cut short.
            let err = read_frame(&mut Cursor::new(big[..100].to_vec()), 1 << 20)
                .await
                .unwrap_err();
            assert!(err.to_string().contains("frame"), "{err}");
            let mut pipe = Cursor::new(vec![9, 0, 0, 0, 1, 2]);
            assert!(read_message::<_, Request>(&mut pipe).await.is_err());
            let mut pipe = Cursor::new(vec![9, 0]);
            assert!(read_message::<_, Request>(&mut pipe).await.is_err());
            // Garbage of a plausible length.
            let mut pipe = Cursor::new([&[5u8, 0, 0, 0][..], &[0xFF; 5]].concat());
            assert!(read_message::<_, Request>(&mut pipe).await.is_err());
        });
    }
}
