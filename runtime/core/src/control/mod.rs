//! The replicated cluster map ([`types`]) and the records it holds ([`records`]).

pub mod imports;
pub mod records;
pub mod types;

pub use imports::{
    ColumnPlan, Format, ImportRecord, ImportSpec, ImportState, NullPolicy, Split, SplitDone,
    SplitUnit,
};
pub use records::{
    AutoscaleStatus, DatasetRecord, DatasetSource, JobRecord, JobState, JobUpdate, SparseShape,
};
pub use types::{
    apply, node_id, ClusterMap, Command, CommandResponse, Member, MemberState, NodeId, NodeInfo,
    Revoked, ShardAssignment,
};
