use super::*;

use proptest::prelude::*;

fn parse(text: &str, label: &str) -> Result<Table, DatasetError> {
    parse_csv(text.as_bytes(), label)
}

fn parse_err(text: &str, label: &str) -> DatasetError {
    match parse(text, label) {
        Ok(t) => panic!("expected an error for {text:?}, got {t:?}"),
        Err(e) => e,
    }
}

/// Copies bytes into 8-aligned memory and views them.
fn view_of(bytes: &[u8]) -> Result<PartitionBuf, DatasetError> {
    PartitionBuf::from_bytes(bytes)
}

// ---- CSV: happy path ----

#[test]
fn parses_header_label_anywhere_and_trims() {
    let t = parse("a, y ,b\n1, 0, 2.5\n-3,1,4e2\n", "y").unwrap();
    assert_eq!(t.features, vec!["a", "b"]);
    assert_eq!(t.label, "y");
    assert_eq!(t.rows, 2);
    assert_eq!(t.x, vec![1.0, 2.5, -3.0, 400.0]);
    assert_eq!(t.y, vec![0.0, 1.0]);
    assert_eq!(t.row(1), Some(&[-3.0f32, 400.0][..]));
    assert_eq!(t.row(2), None);
    t.check().unwrap();
}

#[test]
fn skips_blank_lines_and_accepts_crlf() {
    let t = parse("a,y\r\n1,2\r\n\r\n3,4\r\n", "y").unwrap();
    assert_eq!(t.rows, 2);
    assert_eq!(t.x, vec![1.0, 3.0]);
    assert_eq!(t.y, vec![2.0, 4.0]);
}

// ---- CSV: each refusal, with its line ----

#[test]
fn empty_file() {
    assert_eq!(parse_err("", "y"), DatasetError::Empty { line: 1 });
    assert_eq!(parse_err("\n\n", "y"), DatasetError::Empty { line: 1 });
}

#[test]
fn no_header() {
    assert_eq!(
        parse_err("1,2\n3,4\n", "y"),
        DatasetError::NoHeader { line: 1 }
    );
}

#[test]
fn header_without_rows() {
    assert_eq!(parse_err("a,y\n", "y"), DatasetError::NoRows { line: 2 });
}

#[test]
fn missing_label() {
    assert_eq!(
        parse_err("a,b\n1,2\n", "y"),
        DatasetError::MissingLabel {
            line: 1,
            label: "y".into()
        }
    );
}

#[test]
fn only_label_column() {
    assert_eq!(
        parse_err("y\n1\n", "y"),
        DatasetError::NoFeatures {
            line: 1,
            label: "y".into()
        }
    );
}

#[test]
fn duplicate_and_empty_column_names() {
    assert_eq!(
        parse_err("a,y,a\n1,2,3\n", "y"),
        DatasetError::DuplicateColumn {
            line: 1,
            name: "a".into()
        }
    );
    assert_eq!(
        parse_err("a,y,y\n1,2,3\n", "y"),
        DatasetError::DuplicateColumn {
            line: 1,
            name: "y".into()
        }
    );
    assert_eq!(
        parse_err("a,,y\n1,2,3\n", "y"),
        DatasetError::EmptyColumnName { line: 1, column: 2 }
    );
}

#[test]
fn ragged_rows() {
    assert_eq!(
        parse_err("a,b,y\n1,2,3\n4,5\n", "y"),
        DatasetError::Ragged {
            line: 3,
            expected: 3,
            got: 2
        }
    );
    assert_eq!(
        parse_err("a,b,y\n1,2,3\n4,5,6\n\n7,8,9,10\n", "y"),
        DatasetError::Ragged {
            line: 5,
            expected: 3,
            got: 4
        }
    );
}

#[test]
fn non_numeric_cells_name_column_and_text() {
    assert_eq!(
        parse_err("a,b,y\n1,2,3\n4,five,6\n", "y"),
        DatasetError::NonNumeric {
            line: 3,
            column: "b".into(),
            text: "five".into()
        }
    );
    assert_eq!(
        parse_err("a,y\n1,cat\n", "y"),
        DatasetError::NonNumeric {
            line: 2,
            column: "y".into(),
            text: "cat".into()
        }
    );
    assert_eq!(
        parse_err("a,y\n,1\n", "y"),
        DatasetError::NonNumeric {
            line: 2,
            column: "a".into(),
            text: String::new()
        }
    );
    let long = "z".repeat(500);
    match parse_err(&format!("a,y\n{long},1\n"), "y") {
        DatasetError::NonNumeric { text, .. } => assert_eq!(text.len(), MAX_ERROR_TEXT),
        e => panic!("{e:?}"),
    }
}

#[test]
fn non_finite_cells() {
    for bad in ["NaN", "nan", "inf", "-inf", "infinity", "1e39"] {
        assert_eq!(
            parse_err(&format!("a,y\n1,2\n{bad},1\n"), "y"),
            DatasetError::NonFinite {
                line: 3,
                column: "a".into(),
                text: bad.into()
            },
            "{bad}"
        );
    }
}

#[test]
fn cell_cap() {
    // 2 columns, cap 5 cells: two rows fit (4 cells), the third (6) does not.
    let e = parse_csv_with_limit("a,y\n1,2\n3,4\n5,6\n".as_bytes(), "y", 5).unwrap_err();
    assert_eq!(
        e,
        DatasetError::TooLarge {
            line: 4,
            max_cells: 5
        }
    );
    assert!(e.to_string().contains("line 4"));
    let e = parse_csv_with_limit("a,b,y\n1,2,3\n".as_bytes(), "y", 2).unwrap_err();
    assert_eq!(
        e,
        DatasetError::TooLarge {
            line: 1,
            max_cells: 2
        }
    );
}

#[test]
fn reader_errors_carry_a_line() {
    let e = parse_csv(&b"a,y\n1,2\n\xff\xfe,1\n"[..], "y").unwrap_err();
    assert!(
        matches!(e, DatasetError::NonNumeric { line: 3, .. }),
        "{e:?}"
    );
    let e = parse_csv(&b"a\xff,y\n1,2\n"[..], "y").unwrap_err();
    assert!(matches!(e, DatasetError::Csv { line: 1, .. }), "{e:?}");
}

#[test]
fn error_messages_start_with_the_line() {
    let e = parse_err("a,y\n1,2\n3\n", "y");
    assert_eq!(
        e.to_string(),
        "line 3: ragged row: expected 2 fields, got 1"
    );
}

// ---- Partitioning ----

#[test]
fn partition_is_stable_and_keeps_order() {
    let (t, _) = synthetic(500, 3, SyntheticKind::Linear, 1);
    let parts = partition(&t, 8);
    assert_eq!(parts.len(), 8);
    let mut seen = vec![false; t.rows];
    for (s, p) in parts.iter().enumerate() {
        assert!(p.row_ids().windows(2).all(|w| w[0] < w[1]), "order kept");
        for (k, &id) in p.row_ids().iter().enumerate() {
            assert_eq!(shard_for_key(&id.to_le_bytes(), 8) as usize, s);
            let i = id as usize;
            assert!(!seen[i]);
            seen[i] = true;
            assert_eq!(&p.features()[k * 3..k * 3 + 3], t.row(i).unwrap());
            assert_eq!(p.labels()[k], t.y[i]);
        }
    }
    assert!(seen.iter().all(|&b| b));
    assert_eq!(partition(&t, 8), parts, "deterministic");
    // shards == 0 is treated as 1.
    let one = partition(&t, 0);
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].rows(), 500);
}

#[test]
fn partition_of_a_malformed_table_does_not_panic() {
    let t = Table {
        features: vec!["a".into(), "b".into()],
        label: "y".into(),
        rows: 10,
        x: vec![1.0; 7],
        y: vec![0.0; 10],
    };
    assert!(t.check().is_err());
    let total: usize = partition(&t, 4).iter().map(Partition::rows).sum();
    assert_eq!(total, 3);
}

#[test]
fn partition_new_checks_shape() {
    assert!(Partition::new(2, vec![0, 1], vec![0.0, 1.0], vec![0.0; 4]).is_ok());
    assert!(Partition::new(2, vec![0, 1], vec![0.0], vec![0.0; 4]).is_err());
    assert!(Partition::new(2, vec![0, 1], vec![0.0, 1.0], vec![0.0; 3]).is_err());
}

// ---- Binary format ----

fn sample_partition() -> Partition {
    Partition::new(
        3,
        vec![4, 9, 17],
        vec![1.0, 0.0, 2.5],
        (0..9).map(|v| v as f32).collect(),
    )
    .unwrap()
}

#[test]
fn layout_is_as_documented() {
    let bytes = encode_partition(&sample_partition());
    assert_eq!(&bytes[0..4], b"TDDS");
    assert_eq!(u16::from_le_bytes([bytes[4], bytes[5]]), 1);
    assert_eq!(u64::from_le_bytes(bytes[8..16].try_into().unwrap()), 3);
    assert_eq!(u32::from_le_bytes(bytes[16..20].try_into().unwrap()), 3);
    // 32 header + 24 ids + 12 labels (+4 pad) + 36 features (+4 pad) = 112.
    assert_eq!(bytes.len(), 112);
    assert_eq!(u64::from_le_bytes(bytes[32..40].try_into().unwrap()), 4);
    assert_eq!(f32::from_le_bytes(bytes[64..68].try_into().unwrap()), 2.5);
    assert_eq!(&bytes[68..72], &[0; 4]);
    assert_eq!(f32::from_le_bytes(bytes[72..76].try_into().unwrap()), 0.0);
    assert_eq!(f32::from_le_bytes(bytes[104..108].try_into().unwrap()), 8.0);
}

#[test]
fn view_round_trip_in_place() {
    let p = sample_partition();
    let buf = view_of(&encode_partition(&p)).unwrap();
    let v = PartitionView::parse(buf.bytes()).unwrap();
    assert_eq!(v.rows(), 3);
    assert_eq!(v.n_features(), 3);
    assert_eq!(v.row_ids(), &[4, 9, 17]);
    assert_eq!(v.labels(), &[1.0, 0.0, 2.5]);
    assert_eq!(v.row(2), &[6.0, 7.0, 8.0]);
    assert_eq!(v.get_row(3), None);
    assert_eq!(v.to_partition(), p);
    // Zero copy: the slices point into the buffer.
    let range = buf.bytes().as_ptr_range();
    assert!(range.contains(&(v.features().as_ptr() as *const u8)));
    assert!(range.contains(&(v.row_ids().as_ptr() as *const u8)));
    assert_eq!(buf.view().unwrap().to_partition(), p);
}

#[test]
fn empty_and_featureless_partitions() {
    for p in [
        Partition::new(5, vec![], vec![], vec![]).unwrap(),
        Partition::new(0, vec![1, 2], vec![3.0, 4.0], vec![]).unwrap(),
    ] {
        let buf = view_of(&encode_partition(&p)).unwrap();
        let v = buf.view().unwrap();
        assert_eq!(v.to_partition(), p);
        for i in 0..v.rows() {
            assert!(v.row(i).is_empty());
        }
    }
}

#[test]
fn misaligned_input_is_refused_with_a_clear_error() {
    let bytes = encode_partition(&sample_partition());
    let mut words = vec![0u64; bytes.len() / 8 + 1];
    let raw = words.as_mut_bytes();
    raw[1..=bytes.len()].copy_from_slice(&bytes);
    let shifted = &raw[1..=bytes.len()];
    assert_eq!(
        PartitionView::parse(shifted).unwrap_err(),
        DatasetError::Misaligned
    );
    assert!(DatasetError::Misaligned
        .to_string()
        .contains("PartitionBuf"));
    // The copying buffer accepts it.
    assert_eq!(
        view_of(shifted).unwrap().view().unwrap().to_partition(),
        sample_partition()
    );
}

#[test]
fn corrupt_headers_are_named() {
    let good = encode_partition(&sample_partition());
    let with = |at: usize, patch: &[u8]| {
        let mut b = good.clone();
        b[at..at + patch.len()].copy_from_slice(patch);
        view_of(&b).unwrap_err()
    };
    assert_eq!(
        view_of(&good[..31]).unwrap_err(),
        DatasetError::Truncated { got: 31 }
    );
    assert_eq!(
        view_of(&[]).unwrap_err(),
        DatasetError::Truncated { got: 0 }
    );
    assert_eq!(with(0, b"XDDS"), DatasetError::BadMagic { found: *b"XDDS" });
    assert_eq!(
        with(4, &2u16.to_le_bytes()),
        DatasetError::UnsupportedVersion(2)
    );
    assert!(matches!(
        with(6, &2u16.to_le_bytes()),
        DatasetError::UnsupportedHeader { flags: 2, .. }
    ));
    // Flag 1 marks a sparse (CSR) partition: dense bytes under it are refused, not misread.
    assert!(matches!(
        with(6, &1u16.to_le_bytes()),
        DatasetError::LengthMismatch { .. }
            | DatasetError::SizeOverflow { .. }
            | DatasetError::Checksum { .. }
            | DatasetError::Csr(_)
    ));
    assert!(matches!(
        with(20, &1u32.to_le_bytes()),
        DatasetError::UnsupportedHeader { reserved: 1, .. }
    ));
    assert_eq!(
        with(8, &u64::MAX.to_le_bytes()),
        DatasetError::SizeOverflow {
            rows: u64::MAX,
            features: 3
        }
    );
    assert!(matches!(
        with(8, &(1u64 << 60).to_le_bytes()),
        DatasetError::SizeOverflow { .. }
    ));
    assert!(matches!(
        with(16, &u32::MAX.to_le_bytes()),
        DatasetError::LengthMismatch { .. } | DatasetError::SizeOverflow { .. }
    ));
    assert!(matches!(
        with(8, &4u64.to_le_bytes()),
        DatasetError::LengthMismatch { .. }
    ));
    assert!(matches!(
        view_of(&good[..good.len() - 8]).unwrap_err(),
        DatasetError::LengthMismatch { .. }
    ));
    let mut longer = good.clone();
    longer.extend_from_slice(&[0; 8]);
    assert!(matches!(
        view_of(&longer).unwrap_err(),
        DatasetError::LengthMismatch { .. }
    ));
    assert!(matches!(with(40, &[0xff]), DatasetError::Checksum { .. }));
    assert!(matches!(with(24, &[0xff]), DatasetError::Checksum { .. }));
}

#[test]
fn header_counts_with_the_same_length_fail_the_checksum() {
    // One row of 3 or of 4 features pads to the same 16 bytes, so only the checksum (which
    // covers the header) tells them apart.
    let p = Partition::new(3, vec![7], vec![1.0], vec![1.0, 2.0, 3.0]).unwrap();
    let mut b = encode_partition(&p);
    assert_eq!(Layout::new(1, 4).map(|l| l.total), Some(b.len()));
    b[16..20].copy_from_slice(&4u32.to_le_bytes());
    assert!(matches!(
        view_of(&b).unwrap_err(),
        DatasetError::Checksum { .. }
    ));
}

#[test]
fn nonzero_padding_is_refused_even_with_a_matching_checksum() {
    let good = encode_partition(&sample_partition());
    let mut b = good.clone();
    b[68] = 1;
    let sum = checksum(&b[..CHECKSUM_OFFSET], &b[HEADER_LEN..]);
    b[24..32].copy_from_slice(&sum.to_le_bytes());
    assert_eq!(view_of(&b).unwrap_err(), DatasetError::NonZeroPadding);
}

/// Seeded mutations of valid encodings: bit flips, byte overwrites, truncations, extensions and
/// forged header counts. Nothing may panic, and any accepted input must be fully readable.
#[test]
fn corrupt_bytes_never_panic() {
    let (t, _) = synthetic(40, 5, SyntheticKind::Logistic, 3);
    let encodings: Vec<Vec<u8>> = partition(&t, 3).iter().map(encode_partition).collect();
    let mut rng = SplitMix64(0xdead_beef);
    let mut accepted = 0;
    for round in 0..4000 {
        let base = &encodings[round % encodings.len()];
        let mut b = base.clone();
        let pick = |rng: &mut SplitMix64, n: usize| (rng.next_u64() % n.max(1) as u64) as usize;
        match round % 6 {
            0 => {
                for _ in 0..1 + pick(&mut rng, 4) {
                    let i = pick(&mut rng, b.len());
                    b[i] ^= 1 << pick(&mut rng, 8);
                }
            }
            1 => {
                let i = pick(&mut rng, b.len());
                b[i] = rng.next_u64() as u8;
            }
            2 => b.truncate(pick(&mut rng, b.len())),
            3 => b.extend((0..1 + pick(&mut rng, 16)).map(|_| rng.next_u64() as u8)),
            4 => {
                let rows = rng.next_u64() >> pick(&mut rng, 64);
                b[8..16].copy_from_slice(&rows.to_le_bytes());
            }
            _ => {
                let f = (rng.next_u64() >> pick(&mut rng, 64)) as u32;
                b[16..20].copy_from_slice(&f.to_le_bytes());
                // Recompute the checksum so the structural checks are what must catch it.
                if b.len() >= HEADER_LEN {
                    let sum = checksum(&b[..CHECKSUM_OFFSET], &b[HEADER_LEN..]);
                    b[24..32].copy_from_slice(&sum.to_le_bytes());
                }
            }
        }
        // Both entry points: unaligned-tolerant copy and in-place parse on whatever alignment.
        let _ = PartitionView::parse(&b);
        if let Ok(buf) = PartitionBuf::from_bytes(&b) {
            let v = buf.view().unwrap();
            for i in 0..v.rows() {
                let _ = v.row(i);
            }
            assert_eq!(v.labels().len(), v.rows());
            if b != *base {
                // Only a recomputed-checksum round can pass, and only if the shape is sound.
                assert_eq!(
                    round % 6,
                    5,
                    "a corrupted input was accepted in round {round}"
                );
            }
            accepted += 1;
        }
    }
    assert!(accepted > 0);
}

// ---- Synthetic ----

#[test]
fn synthetic_is_seeded_and_has_signal() {
    let (a, wa) = synthetic(2000, 4, SyntheticKind::Logistic, 9);
    let (b, wb) = synthetic(2000, 4, SyntheticKind::Logistic, 9);
    assert_eq!(a, b);
    assert_eq!(wa, wb);
    assert_ne!(synthetic(10, 4, SyntheticKind::Logistic, 10).1, wa);
    a.check().unwrap();
    assert!(a.y.iter().all(|&y| y == 0.0 || y == 1.0));
    // The true weights classify far better than chance.
    let correct = (0..a.rows)
        .filter(|&i| {
            let dot: f32 = a.row(i).unwrap().iter().zip(&wa).map(|(x, w)| x * w).sum();
            (dot > 0.0) == (a.y[i] == 1.0)
        })
        .count();
    assert!(correct as f64 / a.rows as f64 > 0.7, "{correct}");

    let (l, wl) = synthetic(500, 3, SyntheticKind::Linear, 2);
    for i in 0..l.rows {
        let dot: f32 = l.row(i).unwrap().iter().zip(&wl).map(|(x, w)| x * w).sum();
        assert!((dot - l.y[i]).abs() < 0.7, "row {i}");
    }
    assert_eq!(l.features, vec!["x0", "x1", "x2"]);
    assert_eq!(l.label, "y");
}

// ---- Round trip: CSV -> table -> partitions -> bytes -> views ----

fn to_csv(t: &Table, label_at: usize) -> String {
    let mut names: Vec<&str> = t.features.iter().map(String::as_str).collect();
    names.insert(label_at, &t.label);
    let mut s = names.join(",");
    s.push('\n');
    for i in 0..t.rows {
        let mut cells: Vec<String> = t.row(i).unwrap().iter().map(|v| v.to_string()).collect();
        cells.insert(label_at, t.y[i].to_string());
        s.push_str(&cells.join(","));
        s.push('\n');
    }
    s
}

fn assert_views_cover(t: &Table, shards: u32) {
    let mut seen = vec![false; t.rows];
    for (s, p) in partition(t, shards).iter().enumerate() {
        let buf = PartitionBuf::from_bytes(&encode_partition(p)).unwrap();
        let v = PartitionView::parse(buf.bytes()).unwrap();
        assert_eq!(v.n_features(), t.features.len());
        for (k, &id) in v.row_ids().iter().enumerate() {
            let i = id as usize;
            assert!(!seen[i], "row {i} twice");
            seen[i] = true;
            assert_eq!(shard_for_key(&id.to_le_bytes(), shards.max(1)) as usize, s);
            assert_eq!(v.row(k), t.row(i).unwrap());
            assert_eq!(v.labels()[k].to_bits(), t.y[i].to_bits());
        }
    }
    assert!(seen.iter().all(|&b| b), "every row exactly once");
}

#[test]
fn csv_to_views_round_trip() {
    let csv = "m,label,s\n1.5,0,2\n-1,1,0.25\n3,2,1e-3\n7,0,8\n";
    let t = parse(csv, "label").unwrap();
    assert_views_cover(&t, 4);
    let (big, _) = synthetic(3000, 7, SyntheticKind::Linear, 5);
    let again = parse(&to_csv(&big, 3), "y").unwrap();
    assert_eq!(again, big);
    assert_views_cover(&again, 64);
}

fn finite_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        -1.0e6f32..1.0e6f32,
        any::<f32>().prop_filter("finite", |v| v.is_finite()),
        Just(0.0f32),
        Just(-0.0f32),
    ]
}

fn table_strategy() -> impl Strategy<Value = (Table, usize)> {
    (1usize..6, 1usize..40).prop_flat_map(|(nf, rows)| {
        (
            proptest::collection::vec(finite_f32(), nf * rows),
            proptest::collection::vec(finite_f32(), rows),
            0..=nf,
        )
            .prop_map(move |(x, y, label_at)| {
                let t = Table {
                    features: (0..nf).map(|j| format!("f{j}")).collect(),
                    label: "target".into(),
                    rows,
                    x,
                    y,
                };
                (t, label_at)
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn prop_round_trip((t, label_at) in table_strategy(), shards in 0u32..20) {
        let parsed = parse(&to_csv(&t, label_at), "target").unwrap();
        prop_assert_eq!(parsed.features.clone(), t.features.clone());
        prop_assert_eq!(parsed.rows, t.rows);
        // Display prints the shortest text that reads back to the same f32 (-0 and 0 included).
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&parsed.x), bits(&t.x));
        prop_assert_eq!(bits(&parsed.y), bits(&t.y));
        assert_views_cover(&parsed, shards);
    }
}

#[test]
fn line_numbers_count_blank_crlf_and_quoted_lines() {
    assert_eq!(
        parse_err("\r\n\na,b,y\r\n\r\n1,2,3\r\n\r\n\r\n4,5\r\n", "y"),
        DatasetError::Ragged {
            line: 8,
            expected: 3,
            got: 2
        }
    );
    // A quoted field spanning two lines: the next record's line counts both.
    assert_eq!(
        parse_err("a,b,y\n\"1\n\",2,3\n4,x,5\n", "y"),
        DatasetError::NonNumeric {
            line: 4,
            column: "b".into(),
            text: "x".into()
        }
    );
}

#[test]
fn synthetic_shards_cover_every_row_once_and_are_seeded() {
    let parts: Vec<_> = (0..4)
        .map(|s| synthetic_shard(103, 3, SyntheticKind::Logistic, 9, s, 4))
        .collect();
    let mut ids: Vec<u64> = parts.iter().flat_map(|p| p.row_ids().to_vec()).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..103).collect::<Vec<_>>());
    assert_eq!(
        parts[1],
        synthetic_shard(103, 3, SyntheticKind::Logistic, 9, 1, 4)
    );
    assert_ne!(
        parts[1],
        synthetic_shard(103, 3, SyntheticKind::Logistic, 10, 1, 4)
    );
    assert!(parts
        .iter()
        .flat_map(|p| p.labels())
        .all(|&y| y == 0.0 || y == 1.0));
}
