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
    move |e| DhtError::Transport(format!("{what}: {e}"))
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
                Err(DhtError::Transport(
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
    let mut bytes = vec![0u8; HEADER_LEN];
    stream
        .read_exact(&mut bytes)
        .await
        .map_err(io("receiving a frame"))?;
    let header = FrameHeader::parse(&bytes, max_elements)?;
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
