//! Choosing the next token from logits.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Result, ShardError};

/// How the next token is chosen. `temperature == 0` is greedy and ignores
/// the other filters except the repetition penalty.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SamplingConfig {
    /// Softmax temperature; 0 means greedy (always the most likely token).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0 = no limit).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p` (1.0 = off).
    pub top_p: f32,
    /// Divide positive logits / multiply negative ones of already seen tokens
    /// by this (1.0 = off), as llama.cpp and transformers do.
    pub repetition_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repetition_window: usize,
    /// Seed of the random generator, for reproducible sampling.
    pub seed: u64,
}

impl Default for SamplingConfig {
    /// Greedy decoding, no penalty, seed 0.
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            repetition_window: 64,
            seed: 0,
        }
    }
}

impl SamplingConfig {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Sets the temperature.
    pub fn with_temperature(mut self, temperature: f32) -> Self {
        self.temperature = temperature;
        self
    }

    /// Sets top-k.
    pub fn with_top_k(mut self, top_k: usize) -> Self {
        self.top_k = top_k;
        self
    }

    /// Sets top-p.
    pub fn with_top_p(mut self, top_p: f32) -> Self {
        self.top_p = top_p;
        self
    }

    /// Sets the repetition penalty.
    pub fn with_repetition_penalty(mut self, penalty: f32) -> Self {
        self.repetition_penalty = penalty;
        self
    }

    /// Sets the seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ShardError::BadSettings(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!(
                "temperature {} must be 0 or positive",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!(
                "repetition penalty {} must be positive",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// A seeded sampler.
#[derive(Debug)]
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    /// A sampler with `config`, checked.
    pub fn new(config: SamplingConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            rng: StdRng::seed_from_u64(config.seed),
            config,
        })
    }

    /// Picks the next token given `logits` and the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(ShardError::BadSettings("empty logits".into()));
        }
        let mut logits = logits.to_vec();
        if self.config.repetition_penalty != 1.0 {
            let window = history.len().saturating_sub(self.config.repetition_window);
            let mut seen: Vec<u32> = history[window..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / self.config.repetition_penalty
                    } else {
                        *l * self.config.repetition_penalty
                    };
                }
            }
        }
        if self.config.temperature == 0.0 {
            return Ok(argmax(&logits));
        }
        // Candidates sorted by logit, best first; ties keep the lower id.
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if self.config.top_k > 0 {
            order.truncate(self.config.top_k);
        }
        let max = logits[order[0]];
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| (((logits[i] - max) / self.config.temperature) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.config.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cumulative += p;
                    cumulative >= self.config.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            order.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let mut draw: f64 = self.rng.random();
        for (p, &id) in probs.iter().zip(&order) {
            if draw < *p {
                return Ok(id as u32);
            }
            draw -= p;
        }
        Ok(order[order.len() - 1] as u32)
    }
}

/// Index of the largest logit; the lowest index wins ties, NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

swarm_core::with_setters!(SamplingConfig {
    repetition_window: usize => with_repetition_window,
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut s = Sampler::new(SamplingConfig::greedy()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0], &[]).unwrap(), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.5]), 1);
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingConfig::greedy().with_repetition_penalty(2.0)).unwrap();
        // Token 0 would win, but it was already produced: 3.0 / 2 < 2.0.
        assert_eq!(s.sample(&[3.0, 2.0, 1.0], &[0]).unwrap(), 1);
        // Negative logits get more negative, not less.
        assert_eq!(s.sample(&[-1.0, -1.5, -3.0], &[1]).unwrap(), 0);
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_temperature() {
        let cfg = SamplingConfig::greedy().with_temperature(5.0).with_top_k(1);
        let mut s = Sampler::new(cfg).unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.0, 0.5, 0.4], &[]).unwrap(), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities ~ [0.665, 0.245, 0.09]: p = 0.6 keeps only token 0.
        let cfg = SamplingConfig::greedy()
            .with_temperature(1.0)
            .with_top_p(0.6);
        let mut s = Sampler::new(cfg).unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&[2.0, 1.0, 0.0], &[]).unwrap(), 0);
        }
    }

    #[test]
    fn sampling_follows_probabilities_and_is_reproducible() {
        let cfg = SamplingConfig::greedy().with_temperature(1.0).with_seed(7);
        let logits = [0.0, (3.0f32).ln()]; // probabilities 1/4 and 3/4
        let draws = |cfg: &SamplingConfig| {
            let mut s = Sampler::new(cfg.clone()).unwrap();
            (0..4000)
                .map(|_| s.sample(&logits, &[]).unwrap())
                .collect::<Vec<_>>()
        };
        let a = draws(&cfg);
        assert_eq!(a, draws(&cfg), "same seed, same draws");
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "token 1 drawn {ones}");
        assert_ne!(a, draws(&cfg.clone().with_seed(8)));
    }

    #[test]
    fn refuses_nonsense_settings() {
        for cfg in [
            SamplingConfig::greedy().with_temperature(-1.0),
            SamplingConfig::greedy().with_top_p(0.0),
            SamplingConfig::greedy().with_repetition_penalty(0.0),
        ] {
            assert!(matches!(Sampler::new(cfg), Err(ShardError::BadSettings(_))));
        }
    }
}
