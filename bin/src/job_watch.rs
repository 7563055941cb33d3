//! Following a job until it ends: the one polling loop behind `job watch`, `job submit --wait`,
//! the demo and the tests, and its progress bar (step, loss, state; at most [`WIDTH`] columns).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tidepool_runtime::client::ClusterClient;
use tidepool_runtime::control::JobRecord;

use crate::jobs_cli;

/// Widest line the progress bar draws (a classic terminal).
pub const WIDTH: usize = 80;

/// The bar's fixed part; `{msg}` is [`message`], cut to [`MSG_WIDTH`]. With steps up to
/// 9 999 999 the fixed part is 50 columns: spinner and space 2, bar with brackets 26, a space,
/// `step POS/LEN` 20, a space.
const TEMPLATE: &str = "{spinner} [{bar:24}] step {pos:>7}/{len:<7} {msg}";

/// Columns left for the message (state, loss, samples/s) after the fixed part.
pub const MSG_WIDTH: usize = WIDTH - 50;

/// How often the job's record is read.
const POLL: Duration = Duration::from_millis(250);

/// A progress bar for a job, drawing to `target`.
pub fn progress_bar(target: ProgressDrawTarget) -> ProgressBar {
    styled_bar(TEMPLATE, target)
}

/// A bar drawn with `template` (indicatif's syntax) in the CLI's style, drawing to `target`.
pub fn styled_bar(template: &str, target: ProgressDrawTarget) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(1), target);
    bar.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// A number in at most 11 columns: fixed point when that reads well, else scientific.
fn compact(v: f64) -> String {
    if v == 0.0 || (1e-3..1e5).contains(&v.abs()) {
        format!("{v:.5}")
    } else {
        format!("{v:.3e}")
    }
}

/// The bar's message: state, loss, then samples/s if room is left; at most [`MSG_WIDTH`] chars.
pub fn message(rec: &JobRecord) -> String {
    let loss = rec.loss.map_or("-".into(), compact);
    let mut s = format!("{} loss {loss}", rec.state.as_str());
    if let Some(rate) = rec.samples_per_sec {
        let rate = if rate.is_finite() && rate.abs() < 1e7 {
            format!("{rate:.0}")
        } else {
            format!("{rate:.2e}")
        };
        let more = format!(" {rate}/s");
        if s.len() + more.len() <= MSG_WIDTH {
            s.push_str(&more);
        }
    }
    s.chars().take(MSG_WIDTH).collect()
}

/// Shows `rec` on `bar`.
pub fn show(bar: &ProgressBar, rec: &JobRecord) {
    bar.set_length(rec.steps.max(rec.step).max(1));
    bar.set_position(rec.step);
    bar.set_message(message(rec));
}

/// Polls job `id` until it reaches a terminal state (or `timeout`, if given), drawing a progress
/// bar on stderr when `progress` (hidden when stderr is not a terminal). Returns the final
/// record whatever the state; the caller decides what a failed or cancelled job means.
pub async fn follow(
    client: &ClusterClient,
    id: &str,
    progress: bool,
    timeout: Option<Duration>,
) -> Result<JobRecord> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let bar = progress.then(|| progress_bar(ProgressDrawTarget::stderr()));
    loop {
        let rec = jobs_cli::status(client, id).await?;
        if let Some(bar) = &bar {
            show(bar, &rec);
        }
        if rec.state.is_terminal() {
            if let Some(bar) = &bar {
                bar.finish();
            }
            return Ok(rec);
        }
        if let (Some(deadline), Some(t)) = (deadline, timeout) {
            if Instant::now() >= deadline {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                bail!(
                    "job {id} still {} after {} s",
                    rec.state.as_str(),
                    t.as_secs()
                );
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::{Arc, Mutex};
    use tidepool_runtime::control::JobState;

    /// A terminal that records what is written to it.
    #[derive(Debug, Default, Clone)]
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl indicatif::TermLike for Recorder {
        fn width(&self) -> u16 {
            500 // wider than any line: nothing is cut by the terminal, so the test sees it all
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().push(s.to_string());
            Ok(())
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().push(s.to_string());
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn record(step: u64, steps: u64, loss: Option<f64>, rate: Option<f64>) -> JobRecord {
        JobRecord {
            id: "sgd-0123abcd".into(),
            spec: String::new(),
            kind: "sgd".into(),
            dataset: "d".into(),
            coordinator_shard: 0,
            state: JobState::Running,
            step,
            steps,
            loss,
            samples_per_sec: rate,
            coordinator: Some("a-rather-long-node-name-0".into()),
            error: None,
            submitted_seq: 1,
        }
    }

    #[test]
    fn the_bar_fits_in_80_columns() {
        let cases = [
            record(0, 0, None, None),
            record(1, 100, Some(0.512_345), Some(1234.0)),
            record(9_999_999, 9_999_999, Some(-1.0e300), Some(1.0e12)),
            record(5_000, 10_000, Some(f64::NAN), Some(f64::INFINITY)),
        ];
        for (i, rec) in cases.iter().enumerate() {
            let term = Recorder::default();
            let bar = progress_bar(ProgressDrawTarget::term_like(Box::new(term.clone())));
            let mut rec = rec.clone();
            show(&bar, &rec);
            rec.state = JobState::Failed;
            show(&bar, &rec);
            bar.finish();
            let lines = term.0.lock().unwrap().clone();
            assert!(!lines.is_empty(), "case {i}: nothing drawn");
            // indicatif pads a line with spaces to the terminal's width (to wipe the previous
            // one); what it draws is the rest.
            for line in lines.iter().flat_map(|l| l.lines()).map(str::trim_end) {
                let cols = line.chars().count();
                assert!(cols <= WIDTH, "case {i}: {cols} columns: {line:?}");
            }
            let last = lines.iter().rev().find(|l| !l.trim().is_empty()).unwrap();
            assert!(
                last.contains("step") && last.contains("loss") && last.contains("failed"),
                "case {i}: {last:?}"
            );
        }
    }
}
