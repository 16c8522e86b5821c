//! Hidden states on the wire: a fixed 24-byte header, then the values as raw
//! little-endian bytes. No generic serializer touches tensor data, and the
//! header's sizes are checked against a caller's cap before anything is
//! allocated.
//!
//! ```text
//! offset size field
//!      0    4 magic  b"SHTF"
//!      4    2 version (WIRE_VERSION), little-endian
//!      6    1 dtype  (0 = f32, 1 = f16)
//!      7    1 rank   (1..=4)
//!      8   16 dims   4 x u32 little-endian, unused trailing dims = 1
//!     24    . payload, product(dims) * dtype size bytes
//! ```

use half::f16;

use crate::codec::WIRE_VERSION;
use crate::CoreError;

/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 24;
const MAGIC: [u8; 4] = *b"SHTF";

/// Element type of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireDType {
    /// 4-byte IEEE floats: exact.
    F32,
    /// 2-byte IEEE halves: half the bytes, rounded values.
    F16,
}

impl WireDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
        }
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameHeader {
    /// Element type.
    pub dtype: WireDType,
    /// Shape, 1 to 4 dimensions.
    pub dims: Vec<usize>,
}

impl FrameHeader {
    /// Elements in the frame.
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }

    /// Payload bytes after the header.
    pub fn payload_len(&self) -> usize {
        self.elements() * self.dtype.size()
    }

    /// Parses and checks a header; `max_elements` caps the payload before
    /// the caller allocates for it.
    pub fn parse(bytes: &[u8], max_elements: usize) -> Result<Self, CoreError> {
        let bad = |m: String| Err(CoreError::BadTensorFrame(m));
        if bytes.len() < HEADER_LEN {
            return bad(format!(
                "{} bytes is shorter than the {HEADER_LEN}-byte header",
                bytes.len()
            ));
        }
        if bytes[0..4] != MAGIC {
            return bad("not a tensor frame (bad magic)".into());
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != WIRE_VERSION {
            return Err(CoreError::UnsupportedVersion {
                what: "tensor frame",
                got: version,
                supported: WIRE_VERSION,
            });
        }
        let dtype = match bytes[6] {
            0 => WireDType::F32,
            1 => WireDType::F16,
            other => return bad(format!("unknown dtype {other}")),
        };
        let rank = bytes[7] as usize;
        if !(1..=4).contains(&rank) {
            return bad(format!("rank {rank} is not 1..=4"));
        }
        let mut dims = Vec::with_capacity(rank);
        let mut elements: usize = 1;
        for i in 0..4 {
            let at = 8 + 4 * i;
            let d = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
                as usize;
            if i < rank {
                elements = elements
                    .checked_mul(d)
                    .filter(|e| *e <= max_elements)
                    .ok_or_else(|| {
                        CoreError::BadTensorFrame(format!(
                            "more than the {max_elements} elements allowed"
                        ))
                    })?;
                dims.push(d);
            } else if d != 1 {
                return bad(format!("unused dimension {i} is {d}, not 1"));
            }
        }
        Ok(Self { dtype, dims })
    }

    fn write(&self, out: &mut Vec<u8>) -> Result<(), CoreError> {
        if !(1..=4).contains(&self.dims.len()) {
            return Err(CoreError::BadTensorFrame(format!(
                "rank {} is not 1..=4",
                self.dims.len()
            )));
        }
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&WIRE_VERSION.to_le_bytes());
        out.push(match self.dtype {
            WireDType::F32 => 0,
            WireDType::F16 => 1,
        });
        out.push(self.dims.len() as u8);
        for i in 0..4 {
            let d = self.dims.get(i).copied().unwrap_or(1);
            let d = u32::try_from(d).map_err(|_| {
                CoreError::BadTensorFrame(format!("dimension {d} does not fit in u32"))
            })?;
            out.extend_from_slice(&d.to_le_bytes());
        }
        Ok(())
    }
}

/// Encodes f32 values of shape `dims` as a frame of `dtype`. An f16 frame
/// whose values do not all fit f16 (beyond ±65504, or not finite) is sent
/// as f32 instead, so a large activation never arrives as infinity; the
/// header says which it is.
pub fn encode(values: &[f32], dims: &[usize], dtype: WireDType) -> Result<Vec<u8>, CoreError> {
    let mut out = Vec::new();
    encode_into(values, dims, dtype, &mut out)?;
    Ok(out)
}

/// [`encode`], appending the frame to `out` (e.g. right after a message
/// header, so the whole message is built in one buffer).
pub fn encode_into(
    values: &[f32],
    dims: &[usize],
    dtype: WireDType,
    out: &mut Vec<u8>,
) -> Result<(), CoreError> {
    let dtype = match dtype {
        WireDType::F16 if !fits_f16(values) => WireDType::F32,
        other => other,
    };
    let header = FrameHeader {
        dtype,
        dims: dims.to_vec(),
    };
    if header.elements() != values.len() {
        return Err(CoreError::BadTensorFrame(format!(
            "shape {dims:?} holds {} values, {} given",
            header.elements(),
            values.len()
        )));
    }
    out.reserve(HEADER_LEN + header.payload_len());
    let before = out.len();
    if let Err(e) = header.write(out) {
        out.truncate(before);
        return Err(e);
    }
    let start = out.len();
    out.resize(start + header.payload_len(), 0);
    // Fixed-size chunks: the compiler turns these loops into bulk copies
    // and conversions.
    let payload = &mut out[start..];
    match dtype {
        WireDType::F32 => {
            for (chunk, v) in payload.chunks_exact_mut(4).zip(values) {
                chunk.copy_from_slice(&v.to_le_bytes());
            }
        }
        WireDType::F16 => {
            for (chunk, v) in payload.chunks_exact_mut(2).zip(values) {
                chunk.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
    }
    Ok(())
}

/// Whether every value is finite and within f16's range.
fn fits_f16(values: &[f32]) -> bool {
    let max = f16::MAX.to_f32();
    // A max over the absolute values vectorises; NaN fails the comparison.
    let largest = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    largest <= max && values.iter().all(|v| !v.is_nan())
}

/// Decodes a whole frame into its shape and f32 values.
pub fn decode(bytes: &[u8], max_elements: usize) -> Result<(Vec<usize>, Vec<f32>), CoreError> {
    let header = FrameHeader::parse(bytes, max_elements)?;
    let payload = &bytes[HEADER_LEN..];
    if payload.len() != header.payload_len() {
        return Err(CoreError::BadTensorFrame(format!(
            "payload is {} bytes, the header says {}",
            payload.len(),
            header.payload_len()
        )));
    }
    let values = match header.dtype {
        WireDType::F32 => payload
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        WireDType::F16 => payload
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    };
    Ok((header.dims, values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn refuses_bad_frames() {
        let good = encode(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[1, 2, 3], WireDType::F32).unwrap();
        assert_eq!(
            decode(&good, 100).unwrap(),
            (vec![1, 2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
        );
        assert!(decode(&good, 5).is_err(), "over the element cap");
        assert!(
            decode(&good[..good.len() - 1], 100).is_err(),
            "short payload"
        );
        assert!(decode(&good[..10], 100).is_err(), "short header");
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        assert!(decode(&bad_magic, 100).is_err());
        let mut huge = good.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            matches!(decode(&huge, usize::MAX), Err(CoreError::BadTensorFrame(_)))
                || decode(&huge, usize::MAX).is_err()
        );
        let mut version = good.clone();
        version[4] = 9;
        assert!(matches!(
            decode(&version, 100),
            Err(CoreError::UnsupportedVersion { .. })
        ));
        assert!(encode(&[1.0], &[2], WireDType::F32).is_err());
    }

    #[test]
    fn f16_frames_that_would_overflow_go_as_f32() {
        for odd in [1.0e6f32, -70000.0, f32::INFINITY, f32::NAN] {
            let values = [0.5, odd, -2.0];
            let bytes = encode(&values, &[3], WireDType::F16).unwrap();
            assert_eq!(bytes[6], 0, "{odd} should send the frame as f32");
            let (_, got) = decode(&bytes, 3).unwrap();
            assert_eq!(got[0], 0.5);
            assert_eq!(got[2], -2.0);
            assert!(got[1] == odd || (odd.is_nan() && got[1].is_nan()));
        }
        let fits = encode(&[65504.0, -1.0], &[2], WireDType::F16).unwrap();
        assert_eq!(fits[6], 1, "values within range stay f16");
    }

    #[test]
    fn encode_into_appends_and_leaves_nothing_behind_on_error() {
        let mut out = b"head".to_vec();
        encode_into(&[1.0, 2.0], &[1, 2], WireDType::F32, &mut out).unwrap();
        assert_eq!(&out[..4], b"head");
        assert_eq!(
            out[4..],
            encode(&[1.0, 2.0], &[1, 2], WireDType::F32).unwrap()
        );
        let before = out.clone();
        // A dimension beyond u32 fails while the header is being written.
        let huge = u32::MAX as usize + 1;
        assert!(encode_into(&[], &[huge, 0], WireDType::F32, &mut out).is_err());
        assert!(encode_into(&[1.0], &[1, 2], WireDType::F16, &mut out).is_err());
        assert_eq!(out, before);
    }

    proptest! {
        #[test]
        fn frames_round_trip(dims in proptest::collection::vec(1usize..6, 1..=4), seed in any::<u32>(), half in any::<bool>()) {
            let n: usize = dims.iter().product();
            let values: Vec<f32> = (0..n).map(|i| ((i as u32).wrapping_mul(seed) % 1000) as f32 / 7.0 - 50.0).collect();
            let dtype = if half { WireDType::F16 } else { WireDType::F32 };
            let bytes = encode(&values, &dims, dtype).unwrap();
            prop_assert_eq!(bytes.len(), HEADER_LEN + n * dtype.size());
            let (got_dims, got) = decode(&bytes, n).unwrap();
            prop_assert_eq!(got_dims, dims);
            for (a, b) in values.iter().zip(&got) {
                let tolerance = if half { a.abs() * 1e-3 + 1e-3 } else { 0.0 };
                prop_assert!((a - b).abs() <= tolerance, "{} vs {}", a, b);
            }
        }

        #[test]
        fn garbage_is_refused_not_panicked_on(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = decode(&bytes, 1000);
        }
    }
}
