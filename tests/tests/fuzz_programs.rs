//! A bounded sample of the differential fuzzer (`weft_tests::fuzz`): generated and broken
//! frames through `from_pod` and `from_netdev`, then NAT sequences through `from_pod`,
//! `to_netdev` and `from_netdev` with BPF source NAT on, each result byte for byte (and
//! the NAT tables) against the reference model. `cargo xtask fuzz` runs a million of each.
//! Needs root and the eBPF object (`cargo xtask build-ebpf`).

use weft_tests::fuzz;

/// Fixed seeds: the sample is the same every run; `cargo xtask fuzz --seed` explores more.
const SEEDS: [u64; 2] = [0x5eed_0001, 0x5eed_0002];
const FRAMES_PER_SEED: u64 = 15_000;
const NAT_FRAMES_PER_SEED: u64 = 10_000;

#[test]
fn the_programs_agree_with_the_model_on_generated_frames() {
    for seed in SEEDS {
        let report =
            fuzz::run(FRAMES_PER_SEED, NAT_FRAMES_PER_SEED, seed).expect("the fuzzer runs");
        eprintln!("seed {seed:#x}: {}", report.summary());
        assert!(
            report.mismatches.is_empty(),
            "seed {seed:#x}: the programs and the model disagree:\n{}",
            report.mismatches.join("\n")
        );
        // The sample reaches every verdict, or it proves little.
        assert!(
            report.redirected > 100 && report.dropped > 100 && report.passed > 100,
            "seed {seed:#x}: {}",
            report.summary()
        );
        // And the NAT sample reaches its rules: allocation, exhaustion, reuse, errors.
        let nat = &report.nat;
        assert!(
            nat.out > 1000
                && nat.back > 1000
                && nat.icmp_errors > 100
                && nat.alloc_failed > 10
                && nat.reopened > 10
                && nat.took_over > 0
                && nat.marked > 100,
            "seed {seed:#x}: {}",
            nat.summary()
        );
    }
}
