//! Learning-rate schedules.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// Linear warmup, then cosine decay to the minimum at the last step.
    #[default]
    Cosine,
    /// Warmup-stable-decay: linear warmup, constant, then linear decay to the minimum over the
    /// final `decay_fraction` of the steps.
    Wsd,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// For [`ScheduleKind::Wsd`].
    pub decay_fraction: f32,
}

impl Schedule {
    /// Learning rate of 0-based step `step`.
    pub fn lr_at(&self, step: u64) -> f32 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f32 / (self.warmup_steps + 1) as f32;
        }
        let total = self.total_steps.max(1);
        match self.kind {
            ScheduleKind::Cosine => {
                let span = total.saturating_sub(self.warmup_steps).max(1);
                let progress = ((step - self.warmup_steps) as f32 / span as f32).min(1.0);
                let coef = 0.5 * (1.0 + (std::f32::consts::PI * progress).cos());
                self.min_lr + coef * (self.lr - self.min_lr)
            }
            ScheduleKind::Wsd => {
                let decay_steps = ((total as f32 * self.decay_fraction).round() as u64).max(1);
                let decay_start = total.saturating_sub(decay_steps).max(self.warmup_steps);
                if step < decay_start {
                    self.lr
                } else {
                    let progress = ((step - decay_start) as f32
                        / (total - decay_start).max(1) as f32)
                        .min(1.0);
                    self.lr + progress * (self.min_lr - self.lr)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind) -> Schedule {
        Schedule {
            kind,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            total_steps: 110,
            decay_fraction: 0.2,
        }
    }

    #[test]
    fn cosine_warms_up_then_decays_to_min() {
        let s = schedule(ScheduleKind::Cosine);
        assert!(s.lr_at(0) < s.lr_at(5));
        assert!((s.lr_at(10) - 1e-3).abs() < 1e-9);
        assert!((s.lr_at(60) - 5.5e-4).abs() < 1e-6);
        assert!((s.lr_at(110) - 1e-4).abs() < 1e-9);
        assert!((s.lr_at(500) - 1e-4).abs() < 1e-9);
    }

    #[test]
    fn wsd_holds_then_decays_linearly() {
        let s = schedule(ScheduleKind::Wsd);
        assert_eq!(s.lr_at(50), 1e-3);
        assert_eq!(s.lr_at(88), 1e-3);
        assert!((s.lr_at(99) - 5.5e-4).abs() < 1e-6);
        assert!((s.lr_at(110) - 1e-4).abs() < 1e-9);
    }
}
