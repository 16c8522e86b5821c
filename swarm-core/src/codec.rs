//! The one place control messages become bytes and back.
//!
//! Control messages are bincode 2 (little-endian, varint lengths). Every
//! decode has a byte limit that is checked before any allocation, and a
//! message must use every byte it is given: trailing garbage is an error, not
//! silently ignored. Tensors never go through here; see [`crate::tensor_frame`].

use bincode::config::{self, Configuration};
use bincode::{Decode, Encode};

use crate::CoreError;

/// Version of the wire vocabulary. Bumped on any incompatible change.
///
/// - 1: first version (server records, tensor frames).
pub const WIRE_VERSION: u16 = 1;

/// Largest control message accepted, in bytes. Records and control messages
/// are small; anything larger is refused before decoding.
pub const MAX_CONTROL_MESSAGE: usize = 64 * 1024;

const LIMIT: usize = MAX_CONTROL_MESSAGE;

fn config() -> Configuration<config::LittleEndian, config::Varint, config::Limit<LIMIT>> {
    config::standard().with_limit::<LIMIT>()
}

/// Encodes a control message.
pub fn encode<T: Encode>(message: &T) -> Result<Vec<u8>, CoreError> {
    let bytes =
        bincode::encode_to_vec(message, config()).map_err(|e| CoreError::Encode(e.to_string()))?;
    if bytes.len() > MAX_CONTROL_MESSAGE {
        return Err(CoreError::MessageTooLarge {
            size: bytes.len(),
            limit: MAX_CONTROL_MESSAGE,
        });
    }
    Ok(bytes)
}

/// Decodes a control message, refusing oversized input, malformed input and
/// trailing bytes.
pub fn decode<T: Decode<()>>(bytes: &[u8]) -> Result<T, CoreError> {
    if bytes.len() > MAX_CONTROL_MESSAGE {
        return Err(CoreError::MessageTooLarge {
            size: bytes.len(),
            limit: MAX_CONTROL_MESSAGE,
        });
    }
    let (message, used) = bincode::decode_from_slice(bytes, config())
        .map_err(|e| CoreError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(CoreError::Malformed(format!(
            "{} trailing bytes after the message",
            bytes.len() - used
        )));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_oversized_trailing_and_truncated_input() {
        let bytes = encode(&(7u32, String::from("hello"))).unwrap();
        assert_eq!(
            decode::<(u32, String)>(&bytes).unwrap(),
            (7, "hello".into())
        );
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            decode::<(u32, String)>(&trailing),
            Err(CoreError::Malformed(_))
        ));
        assert!(matches!(
            decode::<(u32, String)>(&bytes[..bytes.len() - 1]),
            Err(CoreError::Malformed(_))
        ));
        let huge = vec![0u8; MAX_CONTROL_MESSAGE + 1];
        assert!(matches!(
            decode::<Vec<u8>>(&huge),
            Err(CoreError::MessageTooLarge { .. })
        ));
        // A length prefix claiming 2^40 bytes is refused without allocating.
        let lying = [0xFD, 0, 0, 0, 0, 0, 1, 0, 0];
        assert!(decode::<Vec<u8>>(&lying).is_err());
    }
}
