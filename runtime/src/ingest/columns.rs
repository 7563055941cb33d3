//! Arrow columns to f32 features: which types import, and how a batch of them becomes rows.
//!
//! Numbers (integers, floats, booleans as 0/1, dates and timestamps as their integer value) are
//! one feature each, stored as f32 (integers above 2^24 round to the nearest f32). Strings are
//! categorical: one-hot over the planned values, or hashed into buckets
//! ([`tidepool_core::control::ColumnPlan`]). A null becomes NaN here; the null policy is applied
//! to whole rows by the reader. NaN or infinite input values are refused (as in CSV imports).

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;
use tidepool_core::control::ColumnPlan;

/// What an Arrow type imports as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    Number,
    Text,
}

/// The kind of `dt`, or `None` for a type that does not import (lists, structs, binary, ...).
pub fn kind_of(dt: &DataType) -> Option<ColumnKind> {
    use DataType::*;
    match dt {
        Boolean | Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 | UInt64 | Float16
        | Float32 | Float64 | Date32 | Date64 | Timestamp(..) => Some(ColumnKind::Number),
        Utf8 | LargeUtf8 | Utf8View => Some(ColumnKind::Text),
        Dictionary(_, v) if matches!(**v, Utf8 | LargeUtf8 | Utf8View) => Some(ColumnKind::Text),
        _ => None,
    }
}

/// A column's values as f64 (`None` for null): numbers only.
fn numbers(a: &ArrayRef) -> Result<Vec<Option<f64>>, String> {
    macro_rules! prim {
        ($t:ty) => {
            a.as_primitive::<$t>()
                .iter()
                .map(|v| v.map(|v| v as f64))
                .collect()
        };
    }
    Ok(match a.data_type() {
        DataType::Boolean => a
            .as_boolean()
            .iter()
            .map(|v| v.map(|b| if b { 1.0 } else { 0.0 }))
            .collect(),
        DataType::Int8 => prim!(Int8Type),
        DataType::Int16 => prim!(Int16Type),
        DataType::Int32 => prim!(Int32Type),
        DataType::Int64 => prim!(Int64Type),
        DataType::UInt8 => prim!(UInt8Type),
        DataType::UInt16 => prim!(UInt16Type),
        DataType::UInt32 => prim!(UInt32Type),
        DataType::UInt64 => prim!(UInt64Type),
        DataType::Float16 => a
            .as_primitive::<Float16Type>()
            .iter()
            .map(|v| v.map(f64::from))
            .collect(),
        DataType::Float32 => prim!(Float32Type),
        DataType::Float64 => prim!(Float64Type),
        DataType::Date32 => prim!(Date32Type),
        DataType::Date64 => prim!(Date64Type),
        DataType::Timestamp(unit, _) => {
            use arrow_schema::TimeUnit::*;
            match unit {
                Second => prim!(TimestampSecondType),
                Millisecond => prim!(TimestampMillisecondType),
                Microsecond => prim!(TimestampMicrosecondType),
                Nanosecond => prim!(TimestampNanosecondType),
            }
        }
        other => return Err(format!("type {other} is not a number")),
    })
}

/// A string column's values (`None` for null), whatever its string or dictionary encoding.
pub fn strings(a: &ArrayRef) -> Result<Vec<Option<String>>, String> {
    let utf8: ArrayRef = if a.data_type() == &DataType::Utf8 {
        Arc::clone(a)
    } else {
        arrow_cast::cast(a, &DataType::Utf8).map_err(|e| e.to_string())?
    };
    Ok(utf8
        .as_string::<i32>()
        .iter()
        .map(|v| v.map(str::to_owned))
        .collect())
}

/// The hash bucket of a categorical value.
pub fn bucket(value: &str, buckets: u32) -> usize {
    (xxhash_rust::xxh3::xxh3_64(value.as_bytes()) % u64::from(buckets.max(1))) as usize
}

/// A finite f64 as f32, or an error naming the value.
fn finite(v: f64) -> Result<f32, String> {
    let f = v as f32;
    if f.is_finite() {
        Ok(f)
    } else {
        Err(format!("NaN or infinite values are refused: {v}"))
    }
}

/// Writes column `a` (encoded as `plan`) into `out`, a row-major `rows x width` buffer, at
/// feature offset `offset`; nulls become NaN across the column's features. An error names the
/// batch row.
pub fn fill(
    plan: &ColumnPlan,
    a: &ArrayRef,
    out: &mut [f32],
    width: usize,
    offset: usize,
) -> Result<(), (usize, String)> {
    let w = plan.width();
    let mut put = |row: usize, k: usize, v: f32| out[row * width + offset + k] = v;
    match plan {
        ColumnPlan::Numeric { .. } => {
            for (row, v) in numbers(a).map_err(|e| (0, e))?.into_iter().enumerate() {
                let v = match v {
                    Some(v) => finite(v).map_err(|e| (row, e))?,
                    None => f32::NAN,
                };
                put(row, 0, v);
            }
        }
        ColumnPlan::OneHot { values, .. } => {
            for (row, v) in strings(a).map_err(|e| (0, e))?.into_iter().enumerate() {
                match v {
                    None => (0..w).for_each(|k| put(row, k, f32::NAN)),
                    Some(v) => {
                        let hit = values.binary_search(&v).map_err(|_| {
                            (row, format!("value {v:?} is not one of the planned categories (did the file change during the import?)"))
                        })?;
                        (0..w).for_each(|k| put(row, k, if k == hit { 1.0 } else { 0.0 }));
                    }
                }
            }
        }
        ColumnPlan::Hashed { buckets, .. } => {
            for (row, v) in strings(a).map_err(|e| (0, e))?.into_iter().enumerate() {
                match v {
                    None => (0..w).for_each(|k| put(row, k, f32::NAN)),
                    Some(v) => {
                        let hit = bucket(&v, *buckets);
                        (0..w).for_each(|k| put(row, k, if k == hit { 1.0 } else { 0.0 }));
                    }
                }
            }
        }
        ColumnPlan::Sparse { .. } => {
            return Err((0, "sparse columns come only from libsvm files".to_string()))
        }
    }
    Ok(())
}

/// The label column's values: NaN for null.
pub fn labels(a: &ArrayRef) -> Result<Vec<f32>, (usize, String)> {
    numbers(a)
        .map_err(|e| (0, e))?
        .into_iter()
        .enumerate()
        .map(|(row, v)| match v {
            Some(v) => finite(v).map_err(|e| (row, e)),
            None => Ok(f32::NAN),
        })
        .collect()
}
