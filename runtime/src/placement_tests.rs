use super::*;

#[test]
fn measure() {
    for &eps in &[0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0] {
        let mut worst_j = (0f64, 0u32, 0usize, 0usize);
        let mut worst_l = (0f64, 0u32, 0usize, 0usize);
        for &s in &[1u32, 2, 3, 5, 8, 16, 31, 64, 100, 256, 512, 1024, 4096] {
            for n in 1..=40usize {
                for seed in 0..12 {
                    let members: Vec<String> = (0..n).map(|i| format!("node-{seed}-{i}")).collect();
                    let old = assign(s, &members, eps).unwrap();
                    let mut joined = members.clone();
                    joined.push(format!("new{seed}"));
                    let new = assign(s, &joined, eps).unwrap();
                    let moved = diff(&old, &new).len();
                    let ideal = (s as f64 / (n + 1) as f64 * (1.0 + eps)).ceil() as usize;
                    let excess = moved.saturating_sub(ideal);
                    let r = excess as f64 / (s as f64).sqrt();
                    if r > worst_j.0 { worst_j = (r, s, n, excess); }
                    let leaver = &joined[seed % (n+1)];
                    let rest: Vec<String> = joined.iter().filter(|m| m != &leaver).cloned().collect();
                    let after = assign(s, &rest, eps).unwrap();
                    let moves = diff(&new, &after);
                    let others = moves.iter().filter(|m| &m.from != leaver).count();
                    let r = others as f64 / (s as f64).sqrt();
                    if r > worst_l.0 { worst_l = (r, s, n, others); }
                }
            }
        }
        println!("eps {eps:4}: join worst excess/sqrt(S) {worst_j:?}; leave worst others/sqrt(S) {worst_l:?}");
    }
}
