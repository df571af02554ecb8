//! Issue 14's "any x86 image": the reference guest converted by `qemu-img` into VMware's vmdk
//! and Hyper-V's vhdx, imported with `vmatrix image import`, boots and serves through the
//! switch as any service; and services on other virtual hardware (q35 with UEFI, SATA and an
//! e1000; a pc with IDE) boot, serve and move, with the guest seeing that hardware.

use std::time::Duration;

use futures::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::cluster::{apply_and_wait, cli, migrate_under_load, ps, wait_for, wait_routed};
use crate::lifecycle::{console, read_until};
use crate::support::{data_dir, start_matrix, up_log};

#[tokio::test]
#[ignore = "boots real QEMU on bridges in network namespaces (root); run by scripts/test"]
async fn vmdk_and_vhdx_images_import_and_boot() {
    let _host = crate::support::share_host().await;
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

/// What the guest `id` sees of its hardware, read on its console: the device holding its data
/// partition, its NIC's driver and whether it booted through UEFI.
async fn hardware_seen(d: &std::path::Path, id: &str) -> String {
    let mut s = console(d, id).await;
    let cmd = "\necho \"HW$((1+0)):$(findfs LABEL=vmxdata):\
               $(basename $(readlink /sys/class/net/eth0/device/driver)):\
               $([ -d /sys/firmware/efi ] && echo uefi || echo bios):$((2+3))END\"\n";
    s.send(Message::Binary(cmd.as_bytes().to_vec()))
        .await
        .expect("send");
    // The markers are computed, so the echo of the typed command never matches them.
    let out = read_until(&mut s, ":5END", Duration::from_secs(30)).await;
    let seen = out
        .rsplit("HW1:")
        .next()
        .and_then(|r| r.split(":5END").next())
        .unwrap_or_default()
        .to_owned();
    eprintln!("{id} sees {seen}");
    seen
}

#[tokio::test]
#[ignore = "boots real QEMU on bridges in network namespaces (root); run by scripts/test"]
async fn guests_on_sata_e1000_uefi_and_ide_boot_serve_and_move() {
    let _alone = crate::support::under_load().await;
    let data = data_dir();
    let d = data.path();
    let (_up, front) = start_matrix(
        d,
        &["--machines", "2", "--policy", "min", "--network", "bridge"],
    )
    .await;
    let file = d.join("services.toml");
    std::fs::write(
        &file,
        "[[service]]\nname = \"modern\"\nimage = \"guest:v1\"\nmachine = \"q35\"\n\
         firmware = \"uefi\"\ndisk_bus = \"sata\"\nnic = \"e1000\"\n\n\
         [[service]]\nname = \"legacy\"\nimage = \"guest:v1\"\nmachine = \"pc\"\n\
         disk_bus = \"ide\"\nnic = \"e1000\"\n",
    )
    .unwrap();
    let list = apply_and_wait(d, &file, 2, Duration::from_secs(240)).await;
    for service in ["modern", "legacy"] {
        wait_routed(&front, service).await;
    }
    // SATA and IDE disks are sdX to Linux (virtio's are vdX); which letter depends on probing.
    let on_ata = |seen: &str, rest: &str| seen.starts_with("/dev/sd") && seen.ends_with(rest);
    let seen = hardware_seen(d, "modern-1").await;
    assert!(on_ata(&seen, "2:e1000:uefi"), "{seen}");
    let seen = hardware_seen(d, "legacy-1").await;
    assert!(on_ata(&seen, "2:e1000:bios"), "{seen}");

    // Both ends of a move build the same hardware: the UEFI, SATA, e1000 guest moves under
    // load without a failed request.
    let modern = list.iter().find(|i| i["id"] == "modern-1").unwrap();
    let to = if modern["machine"] == "rm1" {
        "rm2"
    } else {
        "rm1"
    };
    let (_, r) = migrate_under_load(d, &front, ("modern", "modern-1", to), 10.0, 10).await;
    assert_eq!(r.failed(), 0, "{:?}", r.errors);
    let seen = hardware_seen(d, "modern-1").await;
    assert!(on_ata(&seen, "2:e1000:uefi"), "{seen}");
}
