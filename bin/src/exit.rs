//! Exit codes of the `tidepool` command line, in one place, and the errors they are read from.
//!
//! Scripts can tell apart: success, a generic error, a usage error (clap), no node answering,
//! something named that does not exist, a refusal by the cluster, and a job that ended failed or
//! cancelled. `main` maps every error to a code with [`Exit::of`]; the README's "Command line"
//! table and `tidepool --help` print [`Exit::table`].

use tidepool_runtime::client::ClientError;
use tidepool_runtime::codec::ErrorCode;
use tidepool_runtime::control::JobState;

/// What the process exit status means. `chaos run` keeps its own 0/1/2 (see its `--help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything asked for was done (a watched job succeeded).
    Success,
    /// Any other error (bad input file, I/O, timeout, no leader elected, ...).
    Error,
    /// The command line did not parse (clap's own code).
    Usage,
    /// No node answered: the connection to every address failed.
    Unreachable,
    /// What the command names does not exist: job id, dataset, member, a model's user.
    NotFound,
    /// The cluster refused: the certificate's role may not do it, or the request clashes with
    /// the cluster's state (a dataset name already taken, a bad request).
    Refused,
    /// The job (`job watch`, `job submit --wait`) or the import (`dataset import URL`) ended
    /// failed.
    JobFailed,
    /// The job (`job watch`, `job submit --wait`) ended cancelled.
    JobCancelled,
    /// The node configuration is invalid (`node run`, `config check`).
    Config,
}

impl Exit {
    /// Every code, in the order the table lists them.
    pub const ALL: [Exit; 9] = [
        Exit::Success,
        Exit::Error,
        Exit::Usage,
        Exit::Unreachable,
        Exit::NotFound,
        Exit::Refused,
        Exit::JobFailed,
        Exit::JobCancelled,
        Exit::Config,
    ];

    /// The process exit status.
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Error => 1,
            Exit::Usage => 2,
            Exit::Unreachable => 3,
            Exit::NotFound => 4,
            Exit::Refused => 5,
            Exit::JobFailed => 6,
            Exit::JobCancelled => 7,
            Exit::Config => crate::daemon::EXIT_CONFIG as u8,
        }
    }

    /// One line on what the code means.
    pub fn meaning(self) -> &'static str {
        match self {
            Exit::Success => "success",
            Exit::Error => "error (anything not listed below)",
            Exit::Usage => "usage: the command line did not parse",
            Exit::Unreachable => "unreachable: no node answered",
            Exit::NotFound => "not found: no such job, dataset, member or model user",
            Exit::Refused => "refused: by role, or by the cluster (e.g. dataset name taken)",
            Exit::JobFailed => {
                "the job or import ended failed (job watch, job submit --wait, dataset import)"
            }
            Exit::JobCancelled => "the job ended cancelled (job watch, job submit --wait)",
            Exit::Config => "invalid configuration (node run, config check)",
        }
    }

    /// The table `tidepool --help` ends with.
    pub fn table() -> String {
        let mut s = String::from("Exit codes:\n");
        for e in Exit::ALL {
            s.push_str(&format!("  {:>2}  {}\n", e.code(), e.meaning()));
        }
        s.push_str("  chaos run: 0 passed, 1 a checker found a violation, 2 setup problem");
        s
    }

    /// The code for a job's final state.
    pub fn of_job(state: JobState) -> Exit {
        match state {
            JobState::Failed => Exit::JobFailed,
            JobState::Cancelled => Exit::JobCancelled,
            _ => Exit::Success,
        }
    }

    /// The code for an error: the first typed error in its chain that says which.
    pub fn of(err: &anyhow::Error) -> Exit {
        for cause in err.chain() {
            if let Some(e) = cause.downcast_ref::<CliError>() {
                return e.exit();
            }
            if let Some(e) = cause.downcast_ref::<ClientError>() {
                return Exit::of_client(e);
            }
        }
        Exit::Error
    }

    /// The code for a client error.
    pub fn of_client(e: &ClientError) -> Exit {
        match e {
            ClientError::NoSeed(_) => Exit::Unreachable,
            ClientError::Refused { code, .. } => match code {
                ErrorCode::NotFound => Exit::NotFound,
                ErrorCode::Forbidden | ErrorCode::BadRequest | ErrorCode::Conflict => Exit::Refused,
                _ => Exit::Error,
            },
            _ => Exit::Error,
        }
    }
}

/// Errors the CLI itself raises that carry an exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A watched job ended without succeeding.
    #[error("job {id} ended {}", state.as_str())]
    JobEnded { id: String, state: JobState },
    /// Importing or registering a dataset under a name that is taken.
    #[error(
        "dataset {0:?} already exists; choose another --name or delete it first \
         (tidepool dataset delete {0})"
    )]
    DatasetExists(String),
    /// Something the command names does not exist (the sentence says what).
    #[error("{0}")]
    NotFound(String),
    /// An import from storage failed (nothing of it is visible).
    #[error("import {id} of dataset {dataset:?} failed: {error}")]
    ImportFailed {
        id: String,
        dataset: String,
        error: String,
    },
}

impl CliError {
    /// Its exit code.
    pub fn exit(&self) -> Exit {
        match self {
            CliError::JobEnded { state, .. } => Exit::of_job(*state),
            CliError::DatasetExists(_) => Exit::Refused,
            CliError::NotFound(_) => Exit::NotFound,
            CliError::ImportFailed { .. } => Exit::JobFailed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn codes_are_distinct_and_documented() {
        let mut codes: Vec<u8> = Exit::ALL.iter().map(|e| e.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Exit::ALL.len(), "two meanings share a code");
        assert_eq!(Exit::Config.code(), 64);
        let table = Exit::table();
        for e in Exit::ALL {
            assert!(
                table.contains(&format!("{:>2}  {}", e.code(), e.meaning())),
                "{table}"
            );
        }
    }

    #[test]
    fn errors_map_to_codes_through_context() {
        let refused = |code| ClientError::Refused {
            code,
            message: "x".into(),
        };
        let cases = [
            (ClientError::NoSeed("down".into()), Exit::Unreachable),
            (refused(ErrorCode::NotFound), Exit::NotFound),
            (refused(ErrorCode::Forbidden), Exit::Refused),
            (refused(ErrorCode::Conflict), Exit::Refused),
            (refused(ErrorCode::BadRequest), Exit::Refused),
            (ClientError::Retryable("no leader".into()), Exit::Error),
        ];
        for (e, want) in cases {
            let err = Err::<(), _>(e).context("doing it").unwrap_err();
            assert_eq!(Exit::of(&err), want, "{err:#}");
        }
        let ended = |state| {
            anyhow::Error::new(CliError::JobEnded {
                id: "j".into(),
                state,
            })
        };
        assert_eq!(Exit::of(&ended(JobState::Failed)), Exit::JobFailed);
        assert_eq!(Exit::of(&ended(JobState::Cancelled)), Exit::JobCancelled);
        assert_eq!(Exit::of(&anyhow::anyhow!("plain")), Exit::Error);
        let dup = anyhow::Error::new(CliError::DatasetExists("iris".into()));
        assert_eq!(Exit::of(&dup), Exit::Refused);
        assert_eq!(
            dup.to_string(),
            "dataset \"iris\" already exists; choose another --name or delete it first \
             (tidepool dataset delete iris)"
        );
    }
}
