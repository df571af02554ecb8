//! A service's `tcp` ports: each on a switch port of its own (`listen`), connections to the
//! service's instances by least connections, bytes copied both ways. Drop and wake work as for
//! HTTP: a dropped service's connections beyond what its instances serve are closed at once; a
//! dormant service is woken and the connection held (bounded) until an instance runs. A
//! connection that cannot reach one instance tries another (nothing was sent yet).
//!
//! Listeners follow the route table: one task per listen port, started when a route names it
//! and stopped when none does.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use crate::proxy::{InFlight, Switch};

/// Keeps one listener per `tcp` port of the route table, until the process ends.
pub(crate) async fn run(switch: Arc<Switch>) {
    let mut routes = switch.routes.clone();
    let mut listeners: HashMap<u16, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        let table = routes.borrow_and_update().clone();
        let wanted: HashMap<u16, String> = table
            .services
            .values()
            .flat_map(|r| {
                r.tcp
                    .iter()
                    .map(|t| (t.listen, r.service.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect();
        listeners.retain(|port, task| {
            let keep = wanted.contains_key(port) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for (&port, service) in &wanted {
            if listeners.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(switch.config.listen.ip(), port);
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    tracing::info!(service, "switch listening on tcp://{addr}");
                    listeners.insert(port, tokio::spawn(accept(switch.clone(), l, port)));
                }
                Err(e) => tracing::warn!(service, "cannot listen on tcp://{addr}: {e}"),
            }
        }
        // A port that could not be bound (busy a moment) is tried again in a second.
        let all_bound = wanted.keys().all(|p| listeners.contains_key(p));
        if all_bound {
            if routes.changed().await.is_err() {
                return;
            }
        } else if let Ok(Err(_)) =
            tokio::time::timeout(Duration::from_secs(1), routes.changed()).await
        {
            return;
        }
    }
}

async fn accept(switch: Arc<Switch>, listener: TcpListener, port: u16) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                let _ = client.set_nodelay(true);
                tokio::spawn(carry(switch.clone(), client, port));
            }
            Err(e) => {
                tracing::warn!("accepting on tcp port {port}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The service and backends of listen port `port` now.
fn route_of(switch: &Switch, port: u16) -> Option<(vmatrix_core::api::ServiceRoute, Vec<String>)> {
    let table = switch.routes.borrow().clone();
    table.services.values().find_map(|r| {
        let t = r.tcp.iter().find(|t| t.listen == port)?;
        Some((r.clone(), t.backends.clone()))
    })
}

/// One client connection, to its end.
async fn carry(switch: Arc<Switch>, mut client: TcpStream, port: u16) {
    let started = Instant::now();
    let mut held_since: Option<Instant> = None;
    let mut avoid: HashSet<String> = HashSet::new();
    let mut routes = switch.routes.clone();
    let mut service = String::new();
    let backend = loop {
        let Some((route, backends)) = route_of(&switch, port) else {
            break None;
        };
        service = route.service.to_string();
        if route.dropped && held_since.is_none() && !switch.admit_dropped(&route) {
            switch.stats.set_priority(&service, route.priority);
            switch.stats.dropped(&service);
            break None;
        }
        if backends.is_empty() {
            if held_since.is_none() {
                if !switch.hold(&service) {
                    switch.stats.dropped(&service);
                    break None;
                }
                held_since = Some(Instant::now());
            }
            switch.wake(&service);
            if held_since.is_some_and(|t| t.elapsed() > switch.config.hold_timeout) {
                break None;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), routes.changed()).await;
            continue;
        }
        let pick = backends
            .iter()
            .filter(|b| !avoid.contains(*b))
            .min_by_key(|b| switch.backend(b).outstanding.load(Ordering::Relaxed))
            .cloned();
        let Some(addr) = pick else {
            if started.elapsed() > switch.config.retry_window {
                break None;
            }
            avoid.clear();
            let _ = tokio::time::timeout(Duration::from_millis(50), routes.changed()).await;
            continue;
        };
        let Ok(sock) = addr.parse::<SocketAddr>() else {
            avoid.insert(addr);
            continue;
        };
        match crate::connect::connect(sock).await {
            Ok(s) => break Some((addr, s)),
            Err(e) => {
                tracing::debug!(service, addr, "tcp connect: {e}");
                avoid.insert(addr);
            }
        }
    };
    if let Some(t) = held_since {
        switch.unhold(&service, t);
    }
    let Some((addr, mut upstream)) = backend else {
        // Refused, or nowhere to go: the client sees its connection closed.
        return;
    };
    let state = switch.backend(&addr);
    state.outstanding.fetch_add(1, Ordering::Relaxed);
    state.sent.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight(state);
    switch.stats.begin(&service);
    let t = Instant::now();
    let ok = tokio::io::copy_bidirectional(&mut client, &mut upstream)
        .await
        .is_ok();
    switch
        .stats
        .end(&service, t.elapsed().as_secs_f64() * 1000.0, ok);
}
