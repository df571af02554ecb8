//! Issue 17: the benchmarks `scripts/bench` puts together into docs/benchmarks.md run and print
//! their section — heading, command, method, table — here shortened (one run, a small image, a
//! short window) with real guests: lazy activation against copy-then-boot, and moves through a
//! real `vmatrix up` as a client sees them.

use crate::support::vmatrix;

async fn bench(args: &[&str]) -> String {
    let out = vmatrix()
        .arg("bench")
        .args(args)
        .env("VMATRIX_LOG", "warn")
        .output()
        .await
        .expect("run vmatrix bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "vmatrix bench {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{stdout}");
    stdout
}

/// The cells of the table row whose first cell starts with `label`.
fn row<'a>(section: &'a str, label: &str) -> Vec<&'a str> {
    section
        .lines()
        .find(|l| l.starts_with(&format!("| {label}")))
        .unwrap_or_else(|| panic!("no row {label:?} in:\n{section}"))
        .trim_matches('|')
        .split(" | ")
        .map(str::trim)
        .collect()
}

#[tokio::test]
#[ignore = "boots real QEMU; run by scripts/test"]
async fn the_benchmarks_print_their_sections_with_real_guests() {
    let _alone = crate::support::under_load().await;
    let work = crate::support::data_dir();
    let work_dir = work.path().to_str().unwrap();

    let a = bench(&[
        "activation",
        "--size",
        "96M",
        "--runs",
        "1",
        "--work",
        work_dir,
    ])
    .await;
    assert!(a.starts_with("## Activation"), "{a}");
    assert!(a.contains("**Method.** Both in-process"), "{a}");
    let small = row(&a, "lazy (NBD from the repository), 64 MiB image");
    assert_eq!(small.last(), Some(&"1.00×"), "{small:?}");
    let copy = row(&a, "copy-then-boot, 96 MiB image");
    assert!(
        copy[1].ends_with(" s"),
        "a time to the first answer: {copy:?}"
    );
    assert_eq!(copy[3], "96 MiB", "the whole image written: {copy:?}");
    let lazy = row(&a, "lazy (NBD from the repository), 96 MiB image");
    let fetched: f64 = lazy[3].trim_end_matches(" MiB").parse().unwrap();
    assert!(
        fetched < 96.0,
        "lazy reads only what the boot touches: {lazy:?}"
    );
    assert!(
        !work.path().join("vmatrix-bench-activation/vms").exists(),
        "the guests' directories are removed"
    );

    let m = bench(&["moves", "--runs", "1", "--window", "5", "--rps", "20"]).await;
    assert!(m.starts_with("## Moves as a client sees them"), "{m}");
    let failed = row(&m, "requests failed while migrating");
    assert!(failed[1].starts_with("0 of "), "{failed:?}");
    let downtime = row(&m, "live migration: QEMU's downtime");
    assert_eq!(downtime[2], "1", "one migration measured: {downtime:?}");
    let resume = row(&m, "first request to a suspended service");
    assert_eq!(resume[2], "1", "{resume:?}");
}
