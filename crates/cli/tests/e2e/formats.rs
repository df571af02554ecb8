//! Issue 14's "any x86 image": the reference guest converted by `qemu-img` into VMware's vmdk
//! and Hyper-V's vhdx, imported with `vmatrix image import`, boots and serves through the
//! switch as any service.

use std::time::Duration;

use crate::cluster::{cli, ps, wait_for, wait_routed};
use crate::support::{data_dir, start_matrix, up_log};

#[tokio::test]
#[ignore = "boots real QEMU on bridges in network namespaces (root); run by scripts/test"]
async fn vmdk_and_vhdx_images_import_and_boot() {
    let data = data_dir();
    let d = data.path();
    let (_up, front) = start_matrix(
        d,
        &["--machines", "2", "--policy", "min", "--network", "bridge"],
    )
    .await;
    let raw = d.join("guest.raw");
    let (ok, _, err) = cli(d, &["image", "export", "guest:v1", raw.to_str().unwrap()]).await;
    assert!(ok, "{err}");
    let mut services = String::new();
    for format in ["vmdk", "vhdx"] {
        let file = d.join(format!("guest.{format}"));
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-O", format])
            .arg(&raw)
            .arg(&file)
            .status()
            .unwrap();
        assert!(st.success(), "qemu-img convert to {format}");
        let image = format!("guest:{format}");
        let (ok, out, err) = cli(d, &["image", "import", &image, file.to_str().unwrap()]).await;
        assert!(ok, "import {format}: {err}");
        eprintln!("{format}: {}", out.trim());
        services.push_str(&format!(
            "[[service]]\nname = \"from-{format}\"\nimage = \"{image}\"\n"
        ));
    }
    let file = d.join("services.toml");
    std::fs::write(&file, services).unwrap();
    let (ok, _, err) = cli(d, &["apply", "-f", file.to_str().unwrap()]).await;
    assert!(ok, "{err}\n{}", up_log(d));
    wait_for("both running", Duration::from_secs(240), async || {
        let list = ps(d).await;
        (list.iter().filter(|i| i["state"] == "running").count() == 2).then_some(())
    })
    .await;
    for format in ["vmdk", "vhdx"] {
        let service = format!("from-{format}");
        wait_routed(&front, &service).await;
        let body = reqwest::get(format!("http://{front}/s/{service}/"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(body.contains("\"instance\""), "{format}: {body}");
        eprintln!("{service}: {body}");
    }
}
