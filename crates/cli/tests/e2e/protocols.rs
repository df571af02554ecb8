//! Issue 11's switch protocols with real QEMU: a service's `tcp` port (the guest's echo on port
//! 7) through the switch on a port of its own; HTTPS with HTTP/2 answered by the switch, checked
//! by a client that verifies the certificate; plaintext HTTP/2 (prior knowledge).

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::cluster::{cli, ps, wait_for, wait_routed};
use crate::support::{data_dir, free_port, start_up, up_log};

#[tokio::test]
#[ignore = "boots real QEMU on bridges in network namespaces (root); run by scripts/test"]
async fn tcp_ports_https_and_http2_through_the_switch() {
    let _host = crate::support::share_host().await;
    let data = data_dir();
    let d = data.path();
    // A certificate for 127.0.0.1 and localhost, signed by a CA only this test trusts.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "vmatrix test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .unwrap();
    std::fs::write(d.join("switch.pem"), leaf.pem()).unwrap();
    std::fs::write(d.join("switch.key"), leaf_key.serialize_pem()).unwrap();

    let (api, front, https, echo) = (free_port(), free_port(), free_port(), free_port());
    let (api, front) = (format!("127.0.0.1:{api}"), format!("127.0.0.1:{front}"));
    let https = format!("127.0.0.1:{https}");
    let (cert, key) = (d.join("switch.pem"), d.join("switch.key"));
    let _up = start_up(
        d,
        &[
            "--machines",
            "1",
            "--policy",
            "min",
            "--network",
            "bridge",
            "--listen",
            &api,
            "--switch-listen",
            &front,
            "--tls-listen",
            &https,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
    .await;
    let services = d.join("web.toml");
    std::fs::write(
        &services,
        format!(
            "[[service]]\nname = \"web\"\nimage = \"guest:v1\"\n\
             ports = [{{ name = \"http\", port = 80, protocol = \"http\" }}, \
             {{ name = \"echo\", port = 7, protocol = \"tcp\", listen = {echo} }}]\n"
        ),
    )
    .unwrap();
    let (ok, _, err) = cli(d, &["apply", "-f", services.to_str().unwrap()]).await;
    assert!(ok, "{err}\n{}", up_log(d));
    wait_for("web running", Duration::from_secs(180), async || {
        ps(d)
            .await
            .iter()
            .any(|i| i["state"] == "running")
            .then_some(())
    })
    .await;
    wait_routed(&front, "web").await;

    // The tcp port: the guest's echo through the switch's own port for it.
    let s = wait_for(
        "the switch's tcp port",
        Duration::from_secs(30),
        async || {
            tokio::net::TcpStream::connect(("127.0.0.1", echo))
                .await
                .ok()
        },
    )
    .await;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r).lines();
    for i in 0..3 {
        w.write_all(format!("through the switch {i}\n").as_bytes())
            .await
            .unwrap();
        let line = tokio::time::timeout(Duration::from_secs(10), r.next_line())
            .await
            .expect("an echo within 10 s")
            .unwrap();
        assert_eq!(
            line.as_deref(),
            Some(format!("through the switch {i}").as_str())
        );
    }
    eprintln!("tcp port {echo} → web's port 7: 3 lines echoed");

    // HTTPS with HTTP/2, the certificate checked against the test's CA.
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_cert.pem().as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .build()
        .unwrap();
    let resp = client
        .get(format!(
            "https://localhost:{}/s/web/",
            https.rsplit(':').next().unwrap()
        ))
        .send()
        .await
        .expect("HTTPS through the switch");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["instance"], "web-1");
    eprintln!(
        "HTTPS: HTTP/2, certificate verified, answered by {}",
        body["instance"]
    );
    // A client that does not trust the CA is refused.
    let untrusting = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .build()
        .unwrap();
    assert!(untrusting
        .get(format!("https://{https}/s/web/"))
        .send()
        .await
        .is_err());

    // Plaintext HTTP/2 (prior knowledge) on the HTTP port.
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = h2c
        .get(format!("http://{front}/s/web/health"))
        .send()
        .await
        .expect("h2c through the switch");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
}
