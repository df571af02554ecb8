//! The load-driven policy (`vmatrix up --policy switching`) with real QEMU: demand measured by
//! the switch scales a service out; a pool too small drops only the lower priority (its excess
//! refused at once, its running instance still serving); quiet scales back in.

use std::time::{Duration, Instant};

use serde_json::Value;
use vmatrix_switch::{run_load, LoadOptions};

use crate::cluster::{cli, ps, wait_for, wait_routed};
use crate::support::{data_dir, free_port, is_qemu_of, kill9, start_up, up_log};

fn running(list: &[Value], service: &str) -> usize {
    list.iter()
        .filter(|i| i["service"] == service && i["state"] == "running")
        .count()
}

async fn dropped_by(d: &std::path::Path, service: &str) -> Value {
    let (ok, out, err) = cli(d, &["services", "--json"]).await;
    assert!(ok, "services: {err}");
    let v: Value = serde_json::from_str(&out).expect("services --json");
    v["dropped"][service].clone()
}

#[tokio::test]
#[ignore = "boots real QEMU; run by scripts/test"]
async fn the_policy_scales_out_drops_the_lower_priority_and_scales_back_in() {
    let _alone = crate::support::under_load().await;
    let data = data_dir();
    let d = data.path();
    let api = format!("127.0.0.1:{}", free_port());
    let front = format!("127.0.0.1:{}", free_port());
    // Two machines of 2 vCPUs: room for 4 instances of 1 vCPU.
    let mut up = start_up(
        d,
        &[
            "--machines",
            "2",
            "--vcpus",
            "2",
            "--policy",
            "switching",
            // Windows short enough for a test (the defaults: 2 and 7 minutes, 10% headroom).
            "--headroom",
            "1.2",
            "--scale-out",
            "5s",
            "--scale-in",
            "30s",
            "--forecast",
            "off",
            "--listen",
            &api,
            "--switch-listen",
            &front,
        ],
    )
    .await;
    let services = d.join("services.toml");
    std::fs::write(
        &services,
        "[[service]]\nname = \"shop\"\nimage = \"guest:v1\"\npriority = 10\nmin = 1\nmax = 3\ncapacity_rps = 10\n\n\
         [[service]]\nname = \"batch\"\nimage = \"guest:v1\"\npriority = 1\nmin = 1\nmax = 3\ncapacity_rps = 10\n",
    )
    .unwrap();
    let (ok, _, err) = cli(d, &["apply", "-f", services.to_str().unwrap()]).await;
    assert!(ok, "{err}\nlast lines of vmatrix up:\n{}", up_log(d));
    wait_for(
        "shop and batch running",
        Duration::from_secs(180),
        async || {
            let l = ps(d).await;
            (running(&l, "shop") == 1 && running(&l, "batch") == 1).then_some(())
        },
    )
    .await;
    wait_routed(&front, "shop").await;
    wait_routed(&front, "batch").await;

    // 1. 25 req/s at 10 req/s per instance, 20% headroom: shop wants 3.
    let shop_load = tokio::spawn({
        let target = format!("http://{front}/s/shop/health");
        async move {
            run_load(&LoadOptions::constant(
                target,
                25.0,
                Duration::from_secs(150),
            ))
            .await
        }
    });
    let started = Instant::now();
    wait_for(
        "shop scaled out to 3",
        Duration::from_secs(120),
        async || (running(&ps(d).await, "shop") == 3).then_some(()),
    )
    .await;
    eprintln!(
        "shop: 25 req/s → 3 instances serving {:.1} s after the load began",
        started.elapsed().as_secs_f64()
    );
    let (_, events, _) = cli(d, &["events"]).await;
    assert!(
        events.contains("scale out: ") && events.contains("instance(s) of shop"),
        "the policy's reason is in the event log:\n{events}"
    );

    // 2. batch wants 3 as well, the pool has one slot left: batch is dropped by the policy,
    // shop keeps all three.
    let batch_started = Instant::now();
    let batch_load = tokio::spawn({
        let target = format!("http://{front}/s/batch/health");
        async move {
            run_load(&LoadOptions::constant(
                target,
                25.0,
                Duration::from_secs(40),
            ))
            .await
        }
    });
    wait_for(
        "batch dropped by the policy",
        Duration::from_secs(60),
        async || (dropped_by(d, "batch").await == "policy").then_some(()),
    )
    .await;
    eprintln!(
        "batch dropped {:.1} s after its load began",
        batch_started.elapsed().as_secs_f64()
    );
    let l = ps(d).await;
    assert_eq!(
        running(&l, "shop"),
        3,
        "the higher priority keeps all it needs"
    );
    assert!(running(&l, "batch") <= 1, "{l:?}");
    assert_eq!(dropped_by(d, "shop").await, Value::Null);
    let b = batch_load.await.unwrap();
    eprintln!(
        "batch under drop: {} sent, {} ok, failures {:?}",
        b.sent, b.ok, b.errors
    );
    assert!(
        b.errors.get("503").copied().unwrap_or(0) > 0,
        "batch's excess is refused: {b:?}"
    );
    assert!(
        b.ok > b.sent / 5,
        "batch's running instance still serves what it can: {b:?}"
    );

    // 3. Quiet: shop goes back to its min once the long window has forgotten the load, and
    // batch is no longer dropped.
    shop_load.abort();
    let quiet = Instant::now();
    wait_for("shop back to 1", Duration::from_secs(180), async || {
        (running(&ps(d).await, "shop") == 1).then_some(())
    })
    .await;
    eprintln!(
        "shop scaled in {:.1} s after the load stopped",
        quiet.elapsed().as_secs_f64()
    );
    wait_for("batch undropped", Duration::from_secs(60), async || {
        dropped_by(d, "batch").await.is_null().then_some(())
    })
    .await;
    let (_, events, _) = cli(d, &["events"]).await;
    assert!(events.contains("scale in: "), "{events}");
    assert!(events.contains("server drop"), "{events}");

    // Two instances left, two machines of two slots: the scale-in empties the emptier machine
    // (or consolidation moves the last one over), and the machine is reported free.
    let cool = Instant::now();
    wait_for("a machine emptied", Duration::from_secs(90), async || {
        let (ok, out, _) = cli(d, &["machines", "--json"]).await;
        let v: Value = serde_json::from_str(&out).ok()?;
        let free = v["machines"].as_array()?.iter().any(|m| m["free"] == true);
        (ok && free).then_some(())
    })
    .await;
    eprintln!(
        "a machine free to power down {:.1} s after shop scaled in",
        cool.elapsed().as_secs_f64()
    );
    let l = ps(d).await;
    assert_eq!(running(&l, "shop") + running(&l, "batch"), 2, "{l:?}");
    let hosts: std::collections::BTreeSet<String> = l
        .iter()
        .filter(|i| i["state"] == "running")
        .map(|i| i["machine"].to_string())
        .collect();
    assert_eq!(hosts.len(), 1, "both on one machine: {l:?}");

    // 4. Recovery: shop's last instance breaks (its QEMU killed); a fresh one takes its place.
    let victim = ps(d)
        .await
        .into_iter()
        .find(|i| i["service"] == "shop" && i["state"] == "running")
        .expect("a running shop instance");
    let id = victim["id"].as_str().unwrap().to_owned();
    kill9("shop's QEMU", is_qemu_of(d, &id));
    let broke = Instant::now();
    wait_for("shop replaced", Duration::from_secs(120), async || {
        let l = ps(d).await;
        (!l.iter().any(|i| i["id"] == id.as_str()) && running(&l, "shop") == 1).then_some(())
    })
    .await;
    eprintln!(
        "recovery: {id} replaced in {:.1} s",
        broke.elapsed().as_secs_f64()
    );

    let _ = up.start_kill();
    let _ = up.wait().await;
}
