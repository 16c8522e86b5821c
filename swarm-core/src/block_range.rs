use std::fmt;

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::CoreError;

/// A half-open span of transformer blocks, `start..end`: block `start` is
/// included, block `end` is not. `0..10` is the first ten blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockRange {
    start: u32,
    end: u32,
}

impl BlockRange {
    /// A range from `start` (inclusive) to `end` (exclusive). It must hold at
    /// least one block.
    pub fn new(start: u32, end: u32) -> Result<Self, CoreError> {
        if end <= start {
            return Err(CoreError::InvalidBlockRange {
                text: format!("{start}..{end}"),
                reason: "END must be greater than START",
            });
        }
        Ok(Self { start, end })
    }

    /// Every block of a model with `block_count` blocks.
    pub fn full(block_count: u32) -> Result<Self, CoreError> {
        Self::new(0, block_count)
    }

    /// First block of the span.
    pub fn start(&self) -> u32 {
        self.start
    }

    /// One past the last block of the span.
    pub fn end(&self) -> u32 {
        self.end
    }

    /// Number of blocks in the span (never zero).
    pub fn len(&self) -> u32 {
        self.end - self.start
    }

    /// Always false: a range holds at least one block. Present for clippy's
    /// `len_without_is_empty` and for symmetry with collections.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether block `index` is inside the span.
    pub fn contains(&self, index: u32) -> bool {
        (self.start..self.end).contains(&index)
    }

    /// The block indices of the span, in order.
    pub fn iter(&self) -> std::ops::Range<u32> {
        self.start..self.end
    }

    /// Checks that the span lies inside a model with `block_count` blocks.
    pub fn check_within(&self, block_count: u32) -> Result<(), CoreError> {
        if self.end > block_count {
            return Err(CoreError::RangeOutsideModel {
                range: self.to_string(),
                block_count,
            });
        }
        Ok(())
    }

    /// Splits `0..block_count` into `parts` contiguous spans whose lengths differ
    /// by at most one, the longer ones first. `parts` is clamped to
    /// `1..=block_count`.
    pub fn split_evenly(block_count: u32, parts: u32) -> Result<Vec<Self>, CoreError> {
        let full = Self::full(block_count)?;
        let parts = parts.clamp(1, full.len());
        let base = block_count / parts;
        let extra = block_count % parts;
        let mut spans = Vec::with_capacity(parts as usize);
        let mut start = 0;
        for i in 0..parts {
            let len = base + u32::from(i < extra);
            spans.push(Self::new(start, start + len)?);
            start += len;
        }
        Ok(spans)
    }
}

impl fmt::Display for BlockRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

impl FromStr for BlockRange {
    type Err = CoreError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| CoreError::InvalidBlockRange {
            text: text.to_owned(),
            reason,
        };
        let (start, end) = text
            .trim()
            .split_once("..")
            .ok_or(invalid("missing '..'"))?;
        let start: u32 = start
            .trim()
            .parse()
            .map_err(|_| invalid("START is not a whole number"))?;
        let end: u32 = end
            .trim()
            .parse()
            .map_err(|_| invalid("END is not a whole number"))?;
        Self::new(start, end).map_err(|_| invalid("END must be greater than START"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_displays() {
        let range: BlockRange = "3..7".parse().unwrap();
        assert_eq!((range.start(), range.end(), range.len()), (3, 7, 4));
        assert_eq!(range.to_string(), "3..7");
        assert!(range.contains(3) && range.contains(6) && !range.contains(7));
    }

    #[test]
    fn rejects_bad_text() {
        for text in ["", "3", "7..3", "3..3", "a..4", "1..b", "-1..3"] {
            let err = text.parse::<BlockRange>().unwrap_err();
            assert!(
                err.to_string().contains("expected START..END"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn checks_model_bounds() {
        let range = BlockRange::new(20, 31).unwrap();
        let err = range.check_within(30).unwrap_err();
        assert!(
            err.to_string().contains("outside the model's 30 blocks"),
            "{err}"
        );
        assert!(BlockRange::new(20, 30).unwrap().check_within(30).is_ok());
    }

    proptest! {
        #[test]
        fn split_evenly_covers_every_block_once(blocks in 1u32..200, parts in 0u32..50) {
            let spans = BlockRange::split_evenly(blocks, parts).unwrap();
            prop_assert_eq!(spans.len() as u32, parts.clamp(1, blocks));
            prop_assert_eq!(spans[0].start(), 0);
            prop_assert_eq!(spans[spans.len() - 1].end(), blocks);
            for pair in spans.windows(2) {
                prop_assert_eq!(pair[0].end(), pair[1].start());
                prop_assert!(pair[0].len() >= pair[1].len());
                prop_assert!(pair[0].len() - pair[1].len() <= 1);
            }
        }

        #[test]
        fn display_parse_round_trip(start in 0u32..10_000, len in 1u32..10_000) {
            let range = BlockRange::new(start, start + len).unwrap();
            prop_assert_eq!(range.to_string().parse::<BlockRange>().unwrap(), range);
        }
    }
}

impl bincode::Encode for BlockRange {
    fn encode<E: bincode::enc::Encoder>(
        &self,
        encoder: &mut E,
    ) -> Result<(), bincode::error::EncodeError> {
        self.start.encode(encoder)?;
        self.end.encode(encoder)
    }
}

impl<Context> bincode::Decode<Context> for BlockRange {
    fn decode<D: bincode::de::Decoder<Context = Context>>(
        decoder: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        let start = u32::decode(decoder)?;
        let end = u32::decode(decoder)?;
        Self::new(start, end).map_err(|_| {
            bincode::error::DecodeError::Other("block range END must be greater than START")
        })
    }
}
bincode::impl_borrow_decode!(BlockRange);
