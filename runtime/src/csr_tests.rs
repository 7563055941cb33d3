#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use super::*;
use crate::dataset::{AnyView, DatasetError, PartitionBuf, PartitionView};

fn sample() -> SparsePartition {
    let mut p = SparsePartition::new(3_000_000);
    p.push(7, 1.0, &[0, 5, 2_999_999], &[1.5, -2.0, 3.0])
        .unwrap();
    p.push(9, 0.0, &[], &[]).unwrap();
    p.push(12, 1.0, &[42], &[0.25]).unwrap();
    p
}

#[test]
fn a_sparse_partition_costs_its_non_zeros_and_reads_back_in_place() {
    let p = sample();
    let bytes = encode_sparse(&p);
    // Three rows of three million columns: header, 3 ids, 3 labels, 4 row pointers, 4 entries.
    assert_eq!(bytes.len(), 32 + 24 + 16 + 32 + 16 + 16);
    let buf = PartitionBuf::from_bytes(&bytes).unwrap();
    let AnyView::Sparse(v) = buf.any_view().unwrap() else {
        panic!("dense view of a sparse partition")
    };
    assert_eq!(v.to_partition(), p);
    assert_eq!(v.row_ids(), &[7, 9, 12]);
    assert_eq!(
        v.csr().row(0),
        (&[0u32, 5, 2_999_999][..], &[1.5f32, -2.0, 3.0][..])
    );
    assert_eq!(v.csr().row(1), (&[][..], &[][..]));
    assert_eq!(v.csr().row(3), (&[][..], &[][..]), "past the end is empty");
    assert_eq!(buf.view().unwrap_err(), DatasetError::SparseNotDense);
    assert!(matches!(
        PartitionView::parse(buf.bytes()),
        Err(DatasetError::SparseNotDense)
    ));
    let empty = encode_sparse(&SparsePartition::new(4));
    assert_eq!(
        PartitionBuf::from_bytes(&empty)
            .unwrap()
            .any_view()
            .unwrap()
            .rows(),
        0
    );
}

#[test]
fn segments_join_with_shifted_row_pointers() {
    let p = sample();
    let mut q = SparsePartition::new(3_000_000);
    q.push(1, 2.0, &[3], &[4.0]).unwrap();
    let (a, b) = (encode_sparse(&p), encode_sparse(&q));
    let (a, b) = (
        PartitionBuf::from_bytes(&a).unwrap(),
        PartitionBuf::from_bytes(&b).unwrap(),
    );
    let mut joined = SparsePartition::new(3_000_000);
    for buf in [&a, &b] {
        let AnyView::Sparse(v) = buf.any_view().unwrap() else {
            panic!()
        };
        joined.extend(&v).unwrap();
    }
    assert_eq!(joined.rows(), 4);
    assert_eq!(joined.csr().row(3), (&[3u32][..], &[4.0f32][..]));
    assert_eq!(joined.csr().row(2), (&[42u32][..], &[0.25f32][..]));
    let mut narrow = SparsePartition::new(10);
    let AnyView::Sparse(v) = a.any_view().unwrap() else {
        panic!()
    };
    assert!(narrow.extend(&v).is_err(), "a wider segment cannot join");
}

#[test]
fn rows_breaking_the_invariants_are_refused() {
    let mut p = SparsePartition::new(10);
    assert!(
        p.push(0, 1.0, &[3, 3], &[1.0, 1.0]).is_err(),
        "repeated column"
    );
    assert!(p.push(0, 1.0, &[4, 2], &[1.0, 1.0]).is_err(), "decreasing");
    assert!(p.push(0, 1.0, &[10], &[1.0]).is_err(), "out of range");
    assert!(p.push(0, 1.0, &[1], &[f32::NAN]).is_err(), "not finite");
    assert!(p.push(0, 1.0, &[1], &[]).is_err(), "lengths");
    assert_eq!(p.rows(), 0);
    assert!(CsrRows::new(5, &[1, 1], &[], &[]).is_err());
    assert!(CsrRows::new(5, &[0, 2, 1], &[0, 1], &[1.0, 1.0]).is_err());
}

/// Every corruption of the body is caught (by the checksum, or by the CSR checks when the
/// checksum is skipped), never a panic.
#[test]
fn corrupt_sparse_partitions_are_refused_not_panicked_on() {
    let bytes = encode_sparse(&sample());
    for i in 0..bytes.len() {
        for flip in [1u8, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[i] ^= flip;
            let copy = PartitionBuf::from_bytes(&b);
            assert!(copy.is_err(), "byte {i} ^ {flip:#x} accepted");
            // Skipping the checksum, the CSR checks still hold what they check.
            let aligned: Vec<u64> = b
                .chunks(8)
                .map(|c| {
                    let mut w = [0u8; 8];
                    w[..c.len()].copy_from_slice(c);
                    u64::from_le_bytes(w)
                })
                .collect();
            let _ = AnyView::parse_checked_before(&aligned.as_bytes()[..b.len()]);
        }
    }
    for cut in 0..bytes.len() {
        assert!(PartitionBuf::from_bytes(&bytes[..cut]).is_err());
    }
    // A forged row pointer past the end, checksum recomputed: refused by the CSR checks.
    let mut p = sample();
    p.indptr[1] = 100;
    assert!(PartitionBuf::from_bytes(&encode_sparse(&p)).is_err());
}
