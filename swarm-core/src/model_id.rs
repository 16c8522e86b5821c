use std::fmt;

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::CoreError;

/// The name a swarm knows a model by, e.g. `smollm2-135m`. Servers hosting
/// blocks of the same weights must announce the same id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModelId(String);

impl ModelId {
    /// Longest accepted id, in bytes.
    pub const MAX_LEN: usize = 128;

    /// Validates and wraps a model id.
    pub fn new(id: impl Into<String>) -> Result<Self, CoreError> {
        let id = id.into();
        let allowed = |c: char| c.is_ascii_alphanumeric() || "-_.:/".contains(c);
        if id.is_empty() || id.len() > Self::MAX_LEN || !id.chars().all(allowed) {
            return Err(CoreError::InvalidModelId(id));
        }
        Ok(Self(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ModelId {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_reasonable_ids_and_refuses_others() {
        assert_eq!(
            ModelId::new("smollm2-135m").unwrap().as_str(),
            "smollm2-135m"
        );
        assert!(ModelId::new("HuggingFaceTB/SmolLM2-135M-Instruct:q4_1").is_ok());
        for bad in ["", "has space", "semi;colon", &"x".repeat(129)] {
            assert!(ModelId::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}

impl bincode::Encode for ModelId {
    fn encode<E: bincode::enc::Encoder>(
        &self,
        encoder: &mut E,
    ) -> Result<(), bincode::error::EncodeError> {
        self.0.encode(encoder)
    }
}

impl<Context> bincode::Decode<Context> for ModelId {
    fn decode<D: bincode::de::Decoder<Context = Context>>(
        decoder: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        let text = String::decode(decoder)?;
        Self::new(text).map_err(|_| bincode::error::DecodeError::Other("invalid model id"))
    }
}
bincode::impl_borrow_decode!(ModelId);
