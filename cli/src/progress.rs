//! Progress bars on a terminal, nothing when output is piped.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lmc_train::fit::{Observer, TrainState};

/// True when progress should be drawn: both stdout and stderr are terminals.
pub fn interactive() -> bool {
    std::io::stdout().is_terminal() && std::io::stderr().is_terminal()
}

/// A bar over epochs x steps with the running loss.
pub struct TrainProgress {
    bar: ProgressBar,
    label: String,
}

impl TrainProgress {
    /// A bar for `total_steps` steps, labelled e.g. "replicate 1/2".
    pub fn new(label: String, total_steps: u64) -> TrainProgress {
        let bar = if interactive() {
            let b = ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} steps {msg} ({elapsed}, eta {eta})",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            b
        } else {
            ProgressBar::hidden()
        };
        bar.set_prefix(label.clone());
        TrainProgress { bar, label }
    }
    /// The bar of a run that starts after `step` steps (a spawned child).
    pub fn starting_at(self, step: u64) -> TrainProgress {
        self.bar.set_position(step);
        self.bar.reset_eta();
        self
    }
    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Observer for TrainProgress {
    fn on_step(&mut self, epoch: usize, _s: u64, _n: u64, loss: f32) {
        self.bar.inc(1);
        if self.bar.position().is_multiple_of(10) {
            self.bar.set_message(format!("epoch {} loss {loss:.4}", epoch + 1));
        }
    }
    fn on_epoch(&mut self, state: &TrainState) -> lmc_train::Result<()> {
        self.bar.set_position(state.steps_done);
        if let Some(t) = state.curve.last().and_then(|r| r.test) {
            self.bar.println(format!(
                "{}: epoch {} test accuracy {:.4}",
                self.label, state.epochs_done, t.accuracy
            ));
        }
        Ok(())
    }
}
