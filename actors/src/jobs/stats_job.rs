//! The `stats` job: count, mean, variance, min, max and a histogram of every column (features
//! and the label), as two exact MapReduce passes ([`super::colstats`]).

use serde::{Deserialize, Serialize};

use super::colstats::{self, FirstPass, PHASE_SQUARES, PHASE_SUMS};
use super::job::{Job, JobError, Partial, ShardData, StepReport, Task};

/// The column-statistics job.
#[derive(Debug, Clone)]
pub struct StatsJob {
    /// Column names: features, then the label.
    columns: Vec<String>,
    bins: usize,
}

/// Its checkpointed state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsState {
    pub first: Option<FirstPass>,
    pub columns: Option<Vec<colstats::ColumnSummary>>,
}

impl StatsJob {
    pub fn new(features: &[String], label: &str, bins: usize) -> Self {
        let mut columns = features.to_vec();
        columns.push(label.to_string());
        StatsJob { columns, bins }
    }
}

impl Job for StatsJob {
    type State = StatsState;

    fn init(&self) -> StatsState {
        StatsState {
            first: None,
            columns: None,
        }
    }

    fn next_task(&self, s: &StatsState) -> Option<Task> {
        match (&s.first, &s.columns) {
            (None, _) => Some(Task {
                phase: PHASE_SUMS,
                broadcast: Vec::new(),
            }),
            (Some(first), None) => Some(Task {
                phase: PHASE_SQUARES,
                broadcast: colstats::squares_broadcast(first, self.bins),
            }),
            (Some(_), Some(_)) => None,
        }
    }

    fn planned_steps(&self, _: &StatsState) -> u64 {
        2
    }

    fn map(&self, _step: u64, task: &Task, data: &ShardData<'_>) -> Result<Partial, JobError> {
        // Refused on the first pass already, rather than after a whole pass over the data.
        if self.bins > 0 && data.csr.is_some() {
            return Err(JobError::Data(colstats::SPARSE_HISTOGRAMS.into()));
        }
        match task.phase {
            PHASE_SUMS => colstats::map_sums(data),
            PHASE_SQUARES => colstats::map_squares(data, &task.broadcast),
            p => Err(JobError::Shape(format!("unknown stats phase {p}"))),
        }
    }

    fn reduce(
        &self,
        s: &mut StatsState,
        task: &Task,
        merged: Partial,
    ) -> Result<StepReport, JobError> {
        let rows = merged.rows;
        match (task.phase, &s.first) {
            (PHASE_SUMS, _) => s.first = Some(FirstPass::reduce(&merged)?),
            (PHASE_SQUARES, Some(first)) => {
                s.columns = Some(colstats::summarize(first, &merged, &self.columns));
            }
            (p, _) => return Err(JobError::Shape(format!("unexpected stats phase {p}"))),
        }
        Ok(StepReport { loss: None, rows })
    }

    fn result(&self, s: &StatsState) -> Result<serde_json::Value, JobError> {
        Ok(serde_json::json!({
            "format": "tidepool-stats/1",
            "columns": s.columns.clone().unwrap_or_default(),
        }))
    }
}
