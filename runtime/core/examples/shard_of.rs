fn main() {
    let shards: u32 = std::env::args().nth(1).unwrap().parse().unwrap();
    for k in std::env::args().skip(2) {
        println!(
            "{k} {}",
            tidepool_core::placement::shard_for_key(k.as_bytes(), shards)
        );
    }
}
