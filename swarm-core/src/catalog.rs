//! What a node tells a peer about the models its swarm serves: the model
//! ids with live server records in its part of the DHT. A client asks a
//! few peers when the model it wants has no servers, to say what the swarm
//! does serve; it then looks each id up itself, so the counts it shows
//! come from verified records, not from what a peer claimed.

use bincode::{Decode, Encode};

use crate::{CoreError, ModelId};

/// Version of [`Catalog`].
pub const CATALOG_VERSION: u16 = 1;
/// Most models a catalog lists.
pub const MAX_CATALOG_MODELS: usize = 256;

/// One model in a [`Catalog`].
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct CatalogModel {
    /// The model.
    pub model: ModelId,
    /// How many servers of it have live records in the answering node's
    /// store.
    pub servers: u32,
}

/// A node's answer: the models it holds live server records of.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Catalog {
    /// [`CATALOG_VERSION`].
    pub version: u16,
    /// At most [`MAX_CATALOG_MODELS`], most servers first.
    pub models: Vec<CatalogModel>,
}

impl Catalog {
    /// A catalog of `models`, most servers first, cut to
    /// [`MAX_CATALOG_MODELS`].
    pub fn new(mut models: Vec<CatalogModel>) -> Self {
        models.sort_by(|a, b| b.servers.cmp(&a.servers).then(a.model.cmp(&b.model)));
        models.truncate(MAX_CATALOG_MODELS);
        Self {
            version: CATALOG_VERSION,
            models,
        }
    }

    /// Checks a catalog received from a peer.
    pub fn check(&self) -> Result<(), CoreError> {
        if self.version != CATALOG_VERSION {
            return Err(CoreError::UnsupportedVersion {
                what: "catalog",
                got: self.version,
                supported: CATALOG_VERSION,
            });
        }
        if self.models.len() > MAX_CATALOG_MODELS {
            return Err(CoreError::Malformed(format!(
                "a catalog of {} models (at most {MAX_CATALOG_MODELS})",
                self.models.len()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    fn entry(model: &str, servers: u32) -> CatalogModel {
        CatalogModel {
            model: ModelId::new(model).unwrap(),
            servers,
        }
    }

    #[test]
    fn catalogs_round_trip_sorted_and_capped() {
        let catalog = Catalog::new(vec![entry("b", 1), entry("a", 3), entry("c", 1)]);
        let names: Vec<&str> = catalog.models.iter().map(|m| m.model.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        let bytes = codec::encode(&catalog).unwrap();
        assert_eq!(codec::decode::<Catalog>(&bytes).unwrap(), catalog);
        let many = Catalog::new(
            (0..MAX_CATALOG_MODELS + 10)
                .map(|i| entry(&format!("m{i}"), 1))
                .collect(),
        );
        assert_eq!(many.models.len(), MAX_CATALOG_MODELS);
        // The largest catalog still fits one control message.
        let long = Catalog::new(
            (0..MAX_CATALOG_MODELS)
                .map(|i| entry(&format!("{i:0>128}"), u32::MAX))
                .collect(),
        );
        assert!(codec::encode(&long).is_ok());
        assert!(long.check().is_ok());
        let future = Catalog {
            version: CATALOG_VERSION + 1,
            ..catalog
        };
        assert!(future.check().is_err());
    }
}
