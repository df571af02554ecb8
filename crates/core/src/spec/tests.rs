use super::*;

fn no_files(name: &str) -> Result<String, String> {
    Err(format!("no file {name} in tests"))
}

const GOOD: &str = r#"
[[service]]
name = "finance"
image = "guest:v1"
priority = 10
min = 1
max = 4
capacity_rps = 50
vcpus = 1
memory_mib = 256
port = 80
health = "/health"

[[service]]
name = "sports"
image = "guest:v1"
"#;

#[test]
fn parses_the_example_with_defaults() {
    let s = parse_services("services.toml", GOOD, &no_files).unwrap();
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].priority, 10);
    assert_eq!(s[1].min, 1);
    assert_eq!(s[1].memory_mib, 256);
}

#[test]
fn errors_name_the_line() {
    let unknown = GOOD.replace("vcpus = 1", "vcpu = 1");
    let e = parse_services("s.toml", &unknown, &no_files).unwrap_err();
    assert_eq!(e.line, 9, "{e}");
    assert!(e.message.contains("vcpu"), "{e}");

    let bad_name = GOOD.replace("name = \"sports\"", "name = \"Sports\"");
    let e = parse_services("s.toml", &bad_name, &no_files).unwrap_err();
    assert_eq!(e.line, 15, "{e}");

    let inverted = GOOD.replace("min = 1\nmax = 4", "min = 5\nmax = 4");
    let e = parse_services("s.toml", &inverted, &no_files).unwrap_err();
    assert_eq!(e.line, 2, "{e}");
    assert!(e
        .to_string()
        .starts_with("s.toml:2: service finance: min (5) is above max (4)"));

    let twice = format!("{GOOD}\n[[service]]\nname = \"finance\"\nimage = \"guest:v1\"\n");
    let e = parse_services("s.toml", &twice, &no_files).unwrap_err();
    assert!(e.message.contains("declared twice"), "{e}");

    let syntax = "[[service]\nname = 1";
    assert_eq!(
        parse_services("s.toml", syntax, &no_files)
            .unwrap_err()
            .line,
        1
    );
}

#[test]
fn ports_and_reach_are_checked_across_the_file() {
    let file = |a: &str, b: &str| {
        format!(
            "[[service]]\nname = \"web\"\nimage = \"guest:v1\"\n{a}\n\n\
             [[service]]\nname = \"db\"\nimage = \"guest:v1\"\n{b}\n"
        )
    };
    let ok = parse_services(
        "s.toml",
        &file(
            "ports = [{ name = \"http\", port = 8080, protocol = \"http\" }]",
            "ports = [{ name = \"pg\", port = 5432, protocol = \"tcp\", listen = 15432 }]\nallow_from = [\"web\"]",
        ),
        &no_files,
    )
    .unwrap();
    assert_eq!(ok[0].http_port(), 8080);
    assert_eq!(ok[1].tcp_ports().collect::<Vec<_>>(), [("pg", 5432, 15432)]);
    let cases = [
        (
            file(
                "",
                "ports = [{ name = \"pg\", port = 5432, protocol = \"tcp\" }]",
            ),
            "needs `listen = PORT`",
        ),
        (
            file(
                "ports = [{ name = \"a\", port = 7, protocol = \"tcp\", listen = 9000 }]",
                "ports = [{ name = \"b\", port = 7, protocol = \"tcp\", listen = 9000 }]",
            ),
            "taken by service web",
        ),
        (file("", "allow_from = [\"shop\"]"), "allow_from names shop"),
        (
            file("ports = [{ name = \"Web\", port = 80 }]", ""),
            "must be 1-32 characters",
        ),
    ];
    for (text, want) in cases {
        let e = parse_services("s.toml", &text, &no_files).unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
    }
}

fn spec(name: &str) -> ServiceSpec {
    ServiceSpec {
        name: ServiceName::new(name).unwrap(),
        image: "guest:v1".parse().unwrap(),
        priority: 0,
        min: 1,
        max: 1,
        capacity_rps: 50.0,
        vcpus: 1,
        memory_mib: 256,
        port: 80,
        health: HealthCheck::default(),
        standby_max: 0,
        spread: true,
        allow_from: Vec::new(),
        egress: false,
        ports: Vec::new(),
        machine: Default::default(),
        firmware: Default::default(),
        disk_bus: Default::default(),
        nic: Default::default(),
        cpu: Default::default(),
        ssh_authorized_keys: Vec::new(),
        user_data: None,
        volumes: Vec::new(),
    }
}

/// Asserts `change` makes the spec invalid in `field`, with `text` in the message.
fn rejects(change: impl FnOnce(&mut ServiceSpec), field: &str, text: &str) {
    let mut s = spec("web");
    change(&mut s);
    let e = s.validate().unwrap_err();
    assert_eq!(e.field, field, "{e}");
    assert_eq!(e.service.as_str(), "web");
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!("service web: {field} ")),
        "{shown}"
    );
    assert!(shown.contains(text), "{shown}");
    assert_eq!(validate_services(&[spec("ok"), s]), Err(e));
}

#[test]
fn a_plain_spec_and_the_bounds_themselves_are_valid() {
    assert_eq!(spec("web").validate(), Ok(()));
    let mut s = spec("web");
    s.min = 1000;
    s.max = 1000;
    s.vcpus = 64;
    s.memory_mib = 1_048_576;
    s.capacity_rps = 1_000_000.0;
    s.port = 65535;
    s.priority = 1000;
    s.health = HealthCheck::http(format!("/{}", "a".repeat(255)));
    assert_eq!(s.validate(), Ok(()));
    s.min = 0;
    s.vcpus = 1;
    s.memory_mib = 64;
    s.capacity_rps = 0.001;
    s.port = 1;
    s.priority = -1000;
    s.health = HealthCheck::http("/h?x=1&y=%20~");
    assert_eq!(s.validate(), Ok(()));
    assert_eq!(validate_services(&[]), Ok(()));
}

#[test]
fn hardware_keys_and_user_data_are_checked_on_the_server_side() {
    let text = "[[service]]\nname = \"old\"\nimage = \"win:xp\"\nmachine = \"pc\"\n\
                firmware = \"uefi\"\ndisk_bus = \"ide\"\nnic = \"e1000\"\ncpu = \"host\"\n\
                ssh_authorized_keys = [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO admin@x\"]\n";
    let s = &parse_services("s.toml", text, &no_files).unwrap()[0];
    assert_eq!(s.hardware().nic, crate::hardware::Nic::E1000);
    assert_eq!(s.hardware().firmware, crate::hardware::Firmware::Uefi);
    let e = parse_services("s.toml", &text.replace("\"pc\"", "\"q35\""), &no_files).unwrap_err();
    assert!(e.to_string().contains("q35 has no IDE"), "{e}");
    let e = parse_services("s.toml", &text.replace("e1000", "rtl8139"), &no_files).unwrap_err();
    assert!(e.to_string().contains("rtl8139"), "{e}");
    rejects(
        |s| s.ssh_authorized_keys = vec!["hunter2".into()],
        "ssh_authorized_keys",
        "not an SSH public key line",
    );
    rejects(
        |s| s.user_data = Some("cloud.yaml".into()),
        "user_data",
        "starting with #cloud-config",
    );
    rejects(
        |s| s.user_data = Some(format!("#cloud-config\n{}", "x".repeat(MAX_USER_DATA))),
        "user_data",
        "at most 65536",
    );
    let mut ok = spec("web");
    ok.user_data = Some("#cloud-config\npackages: []\n".into());
    assert_eq!(ok.validate(), Ok(()));
    // A services file names the file; its content is what the spec carries.
    let with = |data: &str| format!("{text}user_data = \"{data}\"\n");
    let read = |name: &str| match name {
        "ok.yaml" => Ok("#cloud-config\n{}\n".to_owned()),
        "notes.txt" => Ok("remember the milk".to_owned()),
        other => Err(format!("no such file {other}")),
    };
    let s = parse_services("s.toml", &with("ok.yaml"), &read).unwrap();
    assert_eq!(s[0].user_data.as_deref(), Some("#cloud-config\n{}\n"));
    let e = parse_services("s.toml", &with("gone.yaml"), &read).unwrap_err();
    assert!(e.to_string().contains("no such file gone.yaml"), "{e}");
    let e = parse_services("s.toml", &with("notes.txt"), &read).unwrap_err();
    assert!(e.to_string().contains("#cloud-config"), "{e}");
}

#[test]
fn instance_bounds() {
    rejects(|s| s.max = 0, "max", "max must be 1-1000 (got 0)");
    rejects(|s| s.max = 1001, "max", "(got 1001)");
    rejects(|s| s.max = u32::MAX, "max", "(got 4294967295)");
    rejects(
        |s| {
            s.min = 5;
            s.max = 4;
        },
        "min",
        "min (5) is above max (4)",
    );
}

#[test]
fn vcpus_1_to_64() {
    rejects(|s| s.vcpus = 0, "vcpus", "vcpus must be 1-64 (got 0)");
    rejects(|s| s.vcpus = 65, "vcpus", "(got 65)");
}

#[test]
fn memory_64_mib_to_1_tib() {
    rejects(|s| s.memory_mib = 0, "memory_mib", "(got 0)");
    rejects(|s| s.memory_mib = 63, "memory_mib", "(got 63)");
    rejects(|s| s.memory_mib = 1_048_577, "memory_mib", "(got 1048577)");
    rejects(
        |s| s.memory_mib = u32::MAX,
        "memory_mib",
        "memory_mib must be 64-1048576 (got 4294967295)",
    );
}

#[test]
fn capacity_finite_positive_and_bounded() {
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1_000_000.5] {
        rejects(
            |s| s.capacity_rps = bad,
            "capacity_rps",
            "capacity_rps must be",
        );
    }
}

#[test]
fn port_not_zero() {
    rejects(|s| s.port = 0, "port", "port must be 1-65535 (got 0)");
}

#[test]
fn priority_within_a_thousand() {
    rejects(
        |s| s.priority = 1001,
        "priority",
        "-1000 to 1000 (got 1001)",
    );
    rejects(|s| s.priority = i32::MIN, "priority", "(got -2147483648)");
}

#[test]
fn health_is_a_short_printable_path() {
    rejects(
        |s| s.health = HealthCheck::http("/h\r\nX: y"),
        "health",
        r#"(got "/h\r\nX: y")"#,
    );
    for (path, says) in [
        ("/h\n", r#"\n"#),
        ("/h\0", "health must be"),
        ("/a b", "without spaces"),
        ("/a\tb", "health must be"),
        ("/é", "health must be"),
        ("/\u{7f}", "health must be"),
        ("health", "health must be"),
        ("", "health must be"),
    ] {
        rejects(|s| s.health = HealthCheck::http(path), "health", says);
    }
    // Too long, and the message quotes only the start of it.
    let long = format!("/{}", "a".repeat(256));
    let mut s = spec("web");
    s.health = HealthCheck::http(long.clone());
    let e = s.validate().unwrap_err();
    assert_eq!(e.field, "health");
    assert!(e.message.contains("at most 256 bytes"), "{e}");
    assert!(e.message.len() < 300, "{e}");
}

#[test]
fn a_name_declared_twice_is_refused() {
    let e = validate_services(&[spec("web"), spec("db"), spec("web")]).unwrap_err();
    assert_eq!(e.field, "name");
    assert_eq!(e.service.as_str(), "web");
    assert!(
        e.to_string()
            .starts_with("service web: name must be unique"),
        "{e}"
    );
    assert!(e.message.contains("#1 and #3"), "{e}");
}

#[test]
fn the_file_and_the_api_share_the_rules() {
    let cases = [
        ("memory_mib = 256", "memory_mib = 4294967295", "memory_mib"),
        ("vcpus = 1", "vcpus = 0", "vcpus"),
        ("port = 80", "port = 0", "port"),
        ("priority = 10", "priority = 5000", "priority"),
        ("max = 4", "max = 1001", "max"),
        ("capacity_rps = 50", "capacity_rps = nan", "capacity_rps"),
        (
            "health = \"/health\"",
            "health = \"/h\\r\\nX: y\"",
            "health",
        ),
    ];
    for (from, to, field) in cases {
        let text = GOOD.replace(from, to);
        let e = parse_services("s.toml", &text, &no_files).unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(
            e.message.starts_with(&format!("service finance: {field} ")),
            "{e}"
        );
    }
}
