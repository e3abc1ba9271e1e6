//! A bounded sample of the differential fuzzer (`weft_tests::fuzz`): generated and broken
//! frames through `from_pod` and `from_netdev`, each result byte for byte against the
//! reference model. `cargo xtask fuzz` runs a million.
//! Needs root and the eBPF object (`cargo xtask build-ebpf`).

use weft_tests::fuzz;

/// Fixed seeds: the sample is the same every run; `cargo xtask fuzz --seed` explores more.
const SEEDS: [u64; 2] = [0x5eed_0001, 0x5eed_0002];
const FRAMES_PER_SEED: u64 = 15_000;

#[test]
fn the_programs_agree_with_the_model_on_generated_frames() {
    for seed in SEEDS {
        let report = fuzz::run(FRAMES_PER_SEED, seed).expect("the fuzzer runs");
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
    }
}
