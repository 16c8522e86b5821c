//! Shared vocabulary of Sherpa Swarm.
//!
//! This crate does no I/O and reads no clock (callers pass `now`): it names
//! the things every other crate talks about (models, spans of blocks,
//! hardware, signed server records) and owns their wire encoding
//! ([`codec`] for control messages, [`tensor_frame`] for hidden states).

mod block_range;
pub mod catalog;
pub mod codec;
mod error;
mod hardware;
pub mod infer;
mod model_id;
pub mod record;
pub mod tensor_frame;

pub use block_range::BlockRange;
pub use error::CoreError;
pub use hardware::{GpuInfo, HardwareInfo};
pub use model_id::ModelId;
pub use record::{NodeKey, ServerInfo, SignedRecord, VerifiedRecord};

/// Chaining setters for an option struct's public fields, so other crates
/// can build it from `Default` while it stays `#[non_exhaustive]`:
/// `with_setters!(Options { max_length: u32 => with_max_length })`.
#[doc(hidden)]
#[macro_export]
macro_rules! with_setters {
    ($ty:ty { $($field:ident : $fty:ty => $setter:ident),* $(,)? }) => {
        impl $ty {
            $(
                #[doc = concat!("Sets [`", stringify!($field), "`](Self::", stringify!($field), ").")]
                #[must_use]
                pub fn $setter(mut self, value: $fty) -> Self {
                    self.$field = value;
                    self
                }
            )*
        }
    };
}
