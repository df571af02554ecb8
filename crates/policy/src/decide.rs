//! `decide`: one pass from a snapshot to a plan. The steps, in order:
//!
//! 1. **Recovery** — failed instances, and instances on dead machines, are discarded (the
//!    sizing below then replaces them).
//! 2. **Sizing** — each service wants `ceil(max recent demand × headroom ÷ capacity)` instances,
//!    within `min..=max`; with seasonal periods, also what the demand one period ago (a little
//!    ahead of now) asks for. Scale-out looks at a short window, scale-in also needs the long
//!    window to agree (hysteresis: no flapping). Under weighted fair sharing, a pool too small
//!    for every wish is water-filled in proportion to priority.
//! 3. **Keeping** — in priority order, each service keeps the instances it still wants, those on
//!    the fullest machines first, so that a scale-in empties the emptiest machines.
//! 4. **Placing** — in priority order, the missing instances are placed best-fit (least memory
//!    left over) on machines already in use, spreading a service over them, and only then on an
//!    empty machine: instances on a machine that left the pool are migrated, suspended ones are
//!    resumed before anything is cold-booted. When nothing fits, an instance of a lower priority
//!    is suspended to make room (**server drop**: strict priority, headroom and forecast
//!    included, so the higher priority is served as in a large pool); a service that cannot get
//!    what its demand needs now is dropped (the switch refuses its excess load) until capacity
//!    returns.
//! 5. **Relief and consolidation** — a machine whose measured CPU load is hot gives one instance
//!    to a cooler machine; on a tick that placed nothing, while the machines in use are cool,
//!    the emptiest machines are emptied by live migration (a bounded number of moves) so that
//!    they can be powered down.
//!
//! Everything is indexed by position: a tick over 100,000 instances costs a few milliseconds.

use std::collections::BTreeSet;

use crate::model::{Action, Config, InstanceState, Machine, Reason, Service, Sharing, Snapshot};

/// Candidates looked at, after the first that fits, for one that does not yet run the service.
const SPREAD_LOOKAHEAD: usize = 16;
/// Machines tried as consolidation victims per tick.
const CONSOLIDATION_TRIES: usize = 64;

#[derive(Debug, Clone, Copy, Default)]
struct Free {
    vcpus: i64,
    memory: i64,
}

impl Free {
    fn fits(&self, s: &Service) -> bool {
        self.vcpus >= i64::from(s.vcpus) && self.memory >= i64::from(s.memory_mib)
    }
}

type Key = (bool, i64, i64, usize);

/// What a best-fit search looks for.
#[derive(Debug, Clone, Copy, Default)]
struct Fit {
    /// Never this machine.
    avoid: Option<usize>,
    /// Only machines already in use.
    only_used: bool,
    /// Only machines that do not run the service yet.
    only_new: bool,
    /// A paused standby: memory only.
    paused: bool,
}

/// The room left on every machine that takes live load, indexed for best-fit once the kept
/// instances are in (building the index once is cheaper than keeping it up to date for 100,000
/// kept instances).
struct Room {
    free: Vec<Free>,
    usable: Vec<bool>,
    count: Vec<u32>,
    /// Machines that start something, or were given or relieved of an instance, this tick:
    /// consolidation leaves them alone.
    touched: Vec<bool>,
    /// (empty, free memory, free vCPUs, machine) of every usable machine with room left.
    index: BTreeSet<Key>,
    indexed: bool,
}

impl Room {
    /// Healthy dedicated machines only: shared machines never take live load.
    fn new(machines: &[Machine]) -> Self {
        let usable: Vec<bool> = machines.iter().map(|m| m.healthy && m.dedicated).collect();
        let free: Vec<Free> = machines
            .iter()
            .map(|m| Free {
                vcpus: i64::from(m.vcpus),
                memory: i64::from(m.memory_mib),
            })
            .collect();
        Self {
            count: vec![0; machines.len()],
            touched: vec![false; machines.len()],
            index: BTreeSet::new(),
            indexed: false,
            free,
            usable,
        }
    }

    /// Builds the best-fit index (once).
    fn build_index(&mut self) {
        if !self.indexed {
            self.indexed = true;
            self.index = (0..self.free.len())
                .filter(|&m| self.has_room(m))
                .map(|m| self.key(m))
                .collect();
        }
    }

    /// In the index: usable with memory left (a paused standby needs memory only).
    fn has_room(&self, m: usize) -> bool {
        self.usable[m] && self.free[m].memory > 0
    }

    fn key(&self, m: usize) -> Key {
        (
            self.count[m] == 0,
            self.free[m].memory,
            self.free[m].vcpus,
            m,
        )
    }

    fn reindex(&mut self, m: usize, insert: bool) {
        if !self.indexed {
            return;
        }
        if insert && self.has_room(m) {
            self.index.insert(self.key(m));
        } else if !insert {
            self.index.remove(&self.key(m));
        }
    }

    fn fits(&self, m: usize, s: &Service) -> bool {
        self.usable.get(m).copied().unwrap_or(false) && self.free[m].fits(s)
    }

    fn take(&mut self, m: usize, s: &Service) {
        self.change(m, s, 1, 1, 1);
    }

    fn give(&mut self, m: usize, s: &Service) {
        self.change(m, s, -1, -1, -1);
    }

    /// A paused instance: its memory only.
    fn take_paused(&mut self, m: usize, s: &Service) {
        self.change(m, s, 0, 1, 1);
    }

    fn give_paused(&mut self, m: usize, s: &Service) {
        self.change(m, s, 0, -1, -1);
    }

    /// Pausing (-1) or unpausing (+1) an instance there: its CPU only.
    fn cpu(&mut self, m: usize, s: &Service, sign: i64) {
        self.change(m, s, sign, 0, 0);
    }

    fn change(&mut self, m: usize, s: &Service, cpu: i64, mem: i64, count: i64) {
        self.reindex(m, false);
        self.free[m].vcpus -= cpu * i64::from(s.vcpus);
        self.free[m].memory -= mem * i64::from(s.memory_mib);
        self.count[m] = (i64::from(self.count[m]) + count).max(0) as u32;
        self.reindex(m, true);
    }

    /// Best-fit for one instance of `s` (`f.paused`: a standby, memory only): a machine already
    /// in use (fewest machines), one that does not run `s` yet if there is one close by
    /// (spread), with the least memory left over; an empty machine only when no used one fits
    /// (and `f.only_used` is false) — or, for a service that spreads, when all its instances
    /// would otherwise share one machine. `f.only_new`: only a machine that does not run `s`.
    fn best_fit(&mut self, s: &Service, same: &Spread, f: Fit) -> Option<usize> {
        self.build_index();
        let mem = i64::from(s.memory_mib);
        let cpu = if f.paused { 0 } else { i64::from(s.vcpus) };
        let mut best: Option<(u32, usize)> = None;
        let mut looked = 0;
        let used = self
            .index
            .range((false, mem, i64::MIN, 0)..(true, i64::MIN, i64::MIN, 0));
        for &(_, _, free_cpu, m) in used {
            if free_cpu < cpu || Some(m) == f.avoid {
                continue;
            }
            // A service that packs takes the best fit as it comes.
            let n = if s.spread { same.get(m) } else { 0 };
            if n == 0 {
                return Some(m);
            }
            if !f.only_new && best.is_none_or(|(b, _)| n < b) {
                best = Some((n, m));
            }
            looked += 1;
            if looked >= SPREAD_LOOKAHEAD {
                break;
            }
        }
        // One machine failure must not take a spread service down.
        let lonely = s.spread && !f.paused && same.machines() < 2;
        if f.only_used || (best.is_some() && !lonely) {
            return best.map(|(_, m)| m);
        }
        self.index
            .range((true, mem, i64::MIN, 0)..)
            .find(|k| k.2 >= cpu && Some(k.3) != f.avoid)
            .map(|k| k.3)
            .or(best.map(|(_, m)| m))
    }
}

fn recent_max(s: &Service, window: usize) -> f64 {
    s.demand
        .iter()
        .rev()
        .take(window.max(1))
        .fold(0.0f64, |a, b| a.max(*b))
}

fn to_instances(s: &Service, rps: f64, headroom: f64) -> u32 {
    let n = (rps * headroom / s.capacity_rps.max(1e-9)).ceil();
    (n.max(0.0) as u32).clamp(s.min, s.max.max(s.min))
}

/// The instances a service wants now, with hysteresis on the way down: a scale-in needs the
/// long window to agree and to shed more than the tolerance (a service of 100 instances does not
/// give back 3 because a noisy minute left the window).
fn desired(s: &Service, current: u32, c: &Config) -> u32 {
    let recent = recent_max(s, c.scale_out_window);
    let expected = if s.forecast_rps.is_finite() {
        s.forecast_rps
    } else {
        0.0
    };
    let out = to_instances(s, recent.max(expected), c.headroom);
    if out >= current {
        return out;
    }
    // Missing data is not zero demand: an unknown sample in the long window holds the size.
    let unknown = s
        .demand
        .iter()
        .rev()
        .take(c.scale_in_window.max(1))
        .any(|d| !d.is_finite());
    if unknown || s.demand.is_empty() {
        return current;
    }
    let down = out.max(to_instances(
        s,
        recent_max(s, c.scale_in_window),
        c.headroom,
    ));
    if down >= current {
        return current;
    }
    let shed = f64::from(current - down);
    if current > s.max.max(s.min) || shed > f64::from(current) * c.scale_in_tolerance {
        down
    } else {
        current
    }
}

fn demand_now(s: &Service) -> f64 {
    s.demand.last().copied().unwrap_or(0.0)
}

/// Warm standbys a service keeps: enough to cover its largest recent rise, within its bound.
pub(crate) fn standbys(s: &Service) -> u32 {
    if s.standby_max == 0 || s.spike_rps.is_nan() || s.spike_rps <= 0.0 {
        return 0;
    }
    ((s.spike_rps / s.capacity_rps.max(1e-9))
        .ceil()
        .min(f64::from(u32::MAX)) as u32)
        .min(s.standby_max)
}

/// Weighted fair sharing: water-fills the pool's dominant resource in proportion to priority
/// (at least 1), nobody above its wish. Returns each service's allowance in instances.
fn fair_shares(services: &[Service], wants: &[u32], machines: &[Machine]) -> Vec<u32> {
    let (mut cpu, mut mem) = (0.0f64, 0.0f64);
    for m in machines.iter().filter(|m| m.healthy && m.dedicated) {
        cpu += f64::from(m.vcpus);
        mem += f64::from(m.memory_mib);
    }
    if cpu <= 0.0 || mem <= 0.0 {
        return vec![0; services.len()];
    }
    // Each instance's dominant share of the pool.
    let cost: Vec<f64> = services
        .iter()
        .map(|s| (f64::from(s.vcpus) / cpu).max(f64::from(s.memory_mib) / mem))
        .collect();
    let weight = |i: usize| f64::from(services[i].priority.max(1));
    let mut out = vec![0u32; services.len()];
    let mut active: Vec<usize> = (0..services.len()).filter(|&i| wants[i] > 0).collect();
    let mut left = 1.0f64;
    while !active.is_empty() {
        let total: f64 = active.iter().map(|&i| weight(i)).sum();
        let (full, rest): (Vec<usize>, Vec<usize>) = active
            .iter()
            .partition(|&&i| f64::from(wants[i]) * cost[i] <= left * weight(i) / total + 1e-12);
        if full.is_empty() {
            for &i in &rest {
                out[i] = ((left * weight(i) / total) / cost[i].max(1e-12)).floor() as u32;
            }
            break;
        }
        for &i in &full {
            out[i] = wants[i];
            left -= f64::from(wants[i]) * cost[i];
        }
        active = rest;
    }
    out
}

/// One pass from `s` to a plan (see the module docs). Pure: the same snapshot and configuration
/// always give the same plan.
pub fn decide(s: &Snapshot, c: &Config) -> Vec<Action> {
    let mut actions = Vec::new();
    let services = &s.services;
    let up: Vec<bool> = s.machines.iter().map(|m| m.healthy).collect();
    let healthy = |m: usize| up.get(m).copied().unwrap_or(false);
    let mut at = Where(vec![u32::MAX; s.instances.len()]);

    // 1. Recovery; everything else is grouped by service.
    let mut placed: Vec<Vec<usize>> = vec![Vec::new(); services.len()];
    let mut paused: Vec<Vec<usize>> = vec![Vec::new(); services.len()];
    let mut suspended: Vec<Vec<usize>> = vec![Vec::new(); services.len()];
    let mut on_machine = vec![0u32; s.machines.len()];
    let mut starting = vec![false; s.machines.len()];
    for (idx, i) in s.instances.iter().enumerate() {
        let Some(svc) = services.get(i.service) else {
            actions.push(Action::Discard {
                instance: idx,
                reason: format!("service #{} is no longer declared", i.service).into(),
            });
            continue;
        };
        match (i.state, i.machine) {
            (InstanceState::Failed, _) => actions.push(Action::Discard {
                instance: idx,
                reason: format!("failed: replace it with a fresh instance of {}", svc.name).into(),
            }),
            (InstanceState::Starting | InstanceState::Running | InstanceState::Paused, Some(m))
                if !healthy(m) =>
            {
                let name = s.machines.get(m).map_or("?", |m| m.name.as_str());
                actions.push(Action::Discard {
                    instance: idx,
                    reason: format!("machine {name} is down: replace its instances").into(),
                });
            }
            (InstanceState::Starting | InstanceState::Running, Some(m)) => {
                at.0[idx] = m as u32;
                if i.state == InstanceState::Starting {
                    starting[m] = true;
                    at.0[idx] |= STARTING_BIT;
                }
                on_machine[m] += 1;
                placed[i.service].push(idx);
            }
            (InstanceState::Paused, Some(m)) => {
                at.0[idx] = m as u32;
                paused[i.service].push(idx);
            }
            (InstanceState::Suspended, _) | (_, None) => suspended[i.service].push(idx),
        }
    }

    // 2. Sizing.
    let mut wants: Vec<u32> = services
        .iter()
        .zip(&placed)
        .map(|(svc, mine)| desired(svc, mine.len() as u32, c))
        .collect();
    // What the demand needs right now, without headroom or forecast: a service is dropped
    // (its excess refused) only when it cannot get this much; weighted fair sharing shares it.
    let mut needs: Vec<u32> = services
        .iter()
        .zip(&wants)
        .map(|(svc, &w)| to_instances(svc, recent_max(svc, c.scale_out_window), 1.0).min(w))
        .collect();
    let wished = needs.clone();
    if c.sharing == Sharing::WeightedFair {
        // Only a service whose share is below its need is cut (to its share); in a pool that
        // holds every need, headroom and forecasts stay.
        let shares = fair_shares(services, &needs, &s.machines);
        for ((w, n), share) in wants.iter_mut().zip(needs.iter_mut()).zip(shares) {
            if share < *n {
                *n = share;
                *w = share;
            }
        }
    }
    let mut order: Vec<usize> = (0..services.len()).collect();
    order.sort_by(|&a, &b| {
        services[b]
            .priority
            .cmp(&services[a].priority)
            .then(services[a].name.cmp(&services[b].name))
    });

    // Standbys are instances too: within `max` with the running ones.
    let standby: Vec<u32> = services
        .iter()
        .zip(&wants)
        .map(|(svc, &w)| standbys(svc).min(svc.max.saturating_sub(w)))
        .collect();

    // 3. Keeping: the instances on the fullest machines stay (pinned ones first). Paused
    // standbys hold their memory; one on a machine that left the pool is suspended.
    let mut room = Room::new(&s.machines);
    // Instances paused this tick (scale-in to a standby, or CPU freed for a higher priority):
    // standbys of their service, but not unpaused or suspended again in the same plan.
    let mut held: Vec<Vec<usize>> = vec![Vec::new(); services.len()];
    let mut standby_candidates = vec![0u32; services.len()];
    let mut to_pause: Vec<(usize, usize, usize)> = Vec::new();
    // Paused instances per machine (the rest of its count runs).
    let mut running_paused = vec![0u32; s.machines.len()];
    for (si, list) in paused.iter_mut().enumerate() {
        list.retain(|&idx| {
            let m = at.get(idx).unwrap_or(usize::MAX);
            if room.usable.get(m).copied().unwrap_or(false) {
                room.take_paused(m, &services[si]);
                running_paused[m] += 1;
                true
            } else {
                actions.push(Action::Suspend {
                    instance: idx,
                    reason: format!(
                        "{} no longer takes live load: its standby goes to the repository",
                        s.machines.get(m).map_or("?", |x| x.name.as_str())
                    )
                    .into(),
                });
                false
            }
        });
    }
    let mut kept: Vec<Vec<usize>> = vec![Vec::new(); services.len()];
    let mut displaced: Vec<Vec<usize>> = vec![Vec::new(); services.len()];
    for &si in &order {
        let svc = &services[si];
        let mut mine = std::mem::take(&mut placed[si]);
        // Which to keep matters only when some must go: the best `want` (pinned, then running
        // ones — they serve now — then the fullest machine, then by index) go first, in linear
        // time.
        if mine.len() as u32 > wants[si] {
            let key = |idx: &usize| {
                let m = at.get(*idx).unwrap_or(0);
                (
                    !s.instances[*idx].pinned,
                    at.starting(*idx),
                    std::cmp::Reverse(on_machine[m]),
                    m,
                    *idx,
                )
            };
            let want = wants[si] as usize;
            if want > 0 {
                mine.select_nth_unstable_by_key(want - 1, key);
            }
        }
        let mut scale_in: Option<Reason> = None;
        for idx in mine {
            let m = at.get(idx).unwrap_or(0);
            if (kept[si].len() as u32) < wants[si] && room.fits(m, svc) {
                room.take(m, svc);
                kept[si].push(idx);
            } else if (kept[si].len() as u32) < wants[si] {
                displaced[si].push(idx);
            } else if at.starting(idx) {
                // Surplus, but still booting: it can be neither paused nor suspended yet; it
                // holds its place, and a later tick decides.
                if room.usable[m] {
                    room.take(m, svc);
                }
            } else if ((paused[si].len() + held[si].len()) as u32 + standby_candidates[si])
                < standby[si]
                && !at.starting(idx)
                && room.usable[m]
            {
                // Perhaps a warm standby (decided below, once it is known whether its machine
                // stays in use anyway).
                standby_candidates[si] += 1;
                to_pause.push((si, idx, m));
            } else {
                let reason = scale_in
                    .get_or_insert_with(|| {
                        format!(
                            "scale in: {:.1} req/s needs {} instance(s) of {}",
                            demand_now(svc),
                            wants[si],
                            svc.name
                        )
                        .into()
                    })
                    .clone();
                actions.push(Action::Suspend {
                    instance: idx,
                    reason,
                });
            }
        }
    }

    // Scale-in into a warm standby (it keeps its memory, gives back its CPU) only on a machine
    // that keeps running instances anyway: a standby never holds an otherwise empty machine.
    for (si, idx, m) in to_pause {
        let svc = &services[si];
        if room.count[m] > running_paused[m] {
            room.take_paused(m, svc);
            running_paused[m] += 1;
            held[si].push(idx);
            actions.push(Action::Pause {
                instance: idx,
                reason: format!(
                    "scale in to a warm standby: {:.1} req/s needs {} instance(s) of {}",
                    demand_now(svc),
                    wants[si],
                    svc.name
                )
                .into(),
            });
        } else {
            actions.push(Action::Suspend {
                instance: idx,
                reason: format!(
                    "scale in: {:.1} req/s needs {} instance(s) of {}",
                    demand_now(svc),
                    wants[si],
                    svc.name
                )
                .into(),
            });
        }
    }

    // 4. Placing, highest priority first.
    let mut same = Spread::new(s.machines.len());
    room.touched = starting;
    // Shapes (and the priority) for which pushing a lower priority out found nothing: later,
    // lower or equal priorities of that shape would search a subset of it (and a fuller pool).
    let mut no_room: Vec<(u32, u32, i32)> = Vec::new();
    let hopeless = |no_room: &[(u32, u32, i32)], svc: &Service| {
        no_room
            .iter()
            .any(|&(v, m, p)| v == svc.vcpus && m == svc.memory_mib && p >= svc.priority)
    };
    for (rank, &si) in order.iter().enumerate() {
        let svc = &services[si];
        if (kept[si].len() as u32) < wants[si] || (paused[si].len() as u32) < standby[si] {
            same.load(&at, &kept[si]);
        }
        let mut resumable = suspended[si].iter().copied();
        let mut scale_out: Option<Reason> = None;
        let mut moving = std::mem::take(&mut displaced[si]).into_iter();
        // Warm standbys first: they serve in milliseconds. One whose machine lacks the CPU
        // gets it from a lower priority paused there (server drop in the same second).
        while (kept[si].len() as u32) < wants[si] && !paused[si].is_empty() {
            let ready = paused[si].iter().position(|&idx| {
                at.get(idx)
                    .is_some_and(|m| room.free[m].vcpus >= i64::from(svc.vcpus))
            });
            let (pos, freed) = match ready {
                Some(pos) => (pos, Vec::new()),
                None => match paused[si].iter().enumerate().find_map(|(pos, &idx)| {
                    let m = at.get(idx)?;
                    cpu_from_lower(s, &at, &order[rank + 1..], &kept, &room, m, svc)
                        .map(|v| (pos, v))
                }) {
                    Some(found) => found,
                    None => break,
                },
            };
            for (li, k) in freed {
                let idx = kept[li].swap_remove(k);
                let low = &services[li];
                if let Some(m) = at.get(idx) {
                    room.cpu(m, low, -1);
                }
                held[li].push(idx);
                actions.push(Action::Pause {
                    instance: idx,
                    reason: format!(
                        "server drop: free CPU for {} (priority {} over {})",
                        svc.name, svc.priority, low.priority
                    )
                    .into(),
                });
            }
            let idx = paused[si].swap_remove(pos);
            let m = at.get(idx).unwrap_or(0);
            room.cpu(m, svc, 1);
            room.touched[m] = true;
            same.add(m);
            kept[si].push(idx);
            actions.push(Action::Unpause {
                instance: idx,
                reason: format!(
                    "scale out from a warm standby: {:.1} req/s needs {} instance(s) of {}",
                    demand_now(svc),
                    wants[si],
                    svc.name
                )
                .into(),
            });
        }
        while (kept[si].len() as u32) < wants[si] {
            let target = match room.best_fit(svc, &same, Fit::default()) {
                Some(m) => Some(m),
                None if !hopeless(&no_room, svc) => {
                    let m = make_room(
                        s,
                        &at,
                        &order[rank + 1..],
                        &mut kept,
                        &mut room,
                        svc,
                        &mut actions,
                    );
                    if m.is_none() {
                        no_room.push((svc.vcpus, svc.memory_mib, svc.priority));
                    }
                    m
                }
                None => None,
            };
            let Some(m) = target else {
                break;
            };
            room.take(m, svc);
            same.add(m);
            room.touched[m] = true;
            let why: Reason = if (kept[si].len() as u32) < svc.min {
                format!("keep min {} of {}", svc.min, svc.name).into()
            } else {
                scale_out
                    .get_or_insert_with(|| {
                        format!(
                            "scale out: {:.1} req/s needs {} instance(s) of {} at {:.0} req/s each",
                            demand_now(svc),
                            wants[si],
                            svc.name,
                            svc.capacity_rps
                        )
                        .into()
                    })
                    .clone()
            };
            if let Some(idx) = moving.next() {
                let from = at.get(idx);
                let name = from.and_then(|f| s.machines.get(f));
                let name = name.map_or("?", |f| f.name.as_str());
                actions.push(Action::Migrate {
                    instance: idx,
                    to: m,
                    reason: format!("{name} no longer takes live load: move off it").into(),
                });
                // It is on its way: later steps see it where it goes, and leave its source be.
                at.0[idx] = m as u32;
                if let Some(f) = from {
                    room.touched[f] = true;
                }
                kept[si].push(idx);
            } else if let Some(idx) = resumable.next() {
                actions.push(Action::Resume {
                    instance: idx,
                    machine: m,
                    reason: format!("{why} (resume before cold boot)").into(),
                });
                kept[si].push(idx);
            } else {
                actions.push(Action::Activate {
                    service: si,
                    machine: m,
                    reason: why,
                });
                kept[si].push(usize::MAX);
            }
        }
        // Warm standbys beyond what the spike history asks for go to the repository (new ones
        // are placed once every service is, below) — but not those a short service waits to
        // run again (paused for a higher priority's CPU: unpaused first when room returns).
        let short = wants[si].saturating_sub(kept[si].len() as u32);
        while (paused[si].len() + held[si].len()) as u32 > standby[si] + short
            && !paused[si].is_empty()
        {
            let idx = paused[si].pop().unwrap_or(usize::MAX);
            if let Some(m) = at.get(idx) {
                room.give_paused(m, svc);
            }
            actions.push(Action::Suspend {
                instance: idx,
                reason: format!(
                    "standby surplus: {} keeps {} warm standby(s)",
                    svc.name, standby[si]
                )
                .into(),
            });
        }
        // Dormant instances beyond what the service may come back to are thrown away (their
        // saved state is only worth keeping while a resume is likely).
        let running = (kept[si].len() as u32).max(wants[si]);
        let dormant_cap = (f64::from(running) * c.dormant_ratio).ceil() as usize;
        let mut surplus: Option<Reason> = None;
        for idx in resumable.skip(dormant_cap) {
            let reason = surplus.get_or_insert_with(|| {
                format!(
                    "dormant surplus: {} keeps at most {dormant_cap} suspended instance(s)",
                    svc.name
                )
                .into()
            });
            actions.push(Action::Discard {
                instance: idx,
                reason: reason.clone(),
            });
        }
        for idx in moving {
            actions.push(Action::Suspend {
                instance: idx,
                reason: format!(
                    "server drop: its machine left the pool and no room is left for {}",
                    svc.name
                )
                .into(),
            });
        }
        let have = kept[si].len() as u32;
        let short = have < wished[si];
        if short && !svc.dropped {
            actions.push(Action::Drop {
                service: si,
                reason: format!(
                    "server drop: the pool holds {have} of the {} instance(s) {} needs",
                    wished[si], svc.name
                )
                .into(),
            });
        } else if !short && svc.dropped {
            actions.push(Action::Undrop {
                service: si,
                reason: format!(
                    "capacity returned: {} has the {} instance(s) it needs",
                    svc.name, wished[si]
                )
                .into(),
            });
        }
    }

    for (p, h) in paused.iter_mut().zip(held) {
        p.extend(h);
    }
    prepare_standbys(
        s,
        c,
        &at,
        &order,
        &standby,
        &kept,
        &paused,
        &mut room,
        &mut actions,
    );

    // 5. Relief and consolidation: never of a machine that is starting something or was just
    // given an instance.
    let mut budget = c.max_moves;
    relieve_hot(s, c, &kept, &mut room, &mut budget, &mut actions);
    consolidate(s, c, &at, &kept, &paused, &mut room, budget, &mut actions);
    actions
}

/// Machines looked at for one new standby.
const STANDBY_CANDIDATES: usize = 256;

/// 4b. Warm standbys, once every service is placed, highest priority first: each on a machine
/// in use where it can run at once — whose free CPU, plus what lower priorities run there, is
/// not yet promised to another standby (the most such CPU first). Memory only; none where no
/// machine in use can give it CPU, and none for a service that rose within its scale-in window.
#[allow(clippy::too_many_arguments)]
fn prepare_standbys(
    s: &Snapshot,
    c: &Config,
    at: &Where,
    order: &[usize],
    standby: &[u32],
    kept: &[Vec<usize>],
    paused: &[Vec<usize>],
    room: &mut Room,
    actions: &mut Vec<Action>,
) {
    let services = &s.services;
    if !order
        .iter()
        .any(|&si| (paused[si].len() as u32) < standby[si])
    {
        return;
    }
    // (priority, vCPUs) of the instances running on each machine, and CPU already promised.
    let mut running: Vec<Vec<(i32, i64)>> = vec![Vec::new(); s.machines.len()];
    for (si, v) in kept.iter().enumerate() {
        for &idx in v {
            if let Some(m) = at.get(idx) {
                running[m].push((services[si].priority, i64::from(services[si].vcpus)));
            }
        }
    }
    let mut promised = vec![0i64; s.machines.len()];
    // Standbys per machine: a machine that holds nothing else is no place for another.
    let mut standing = vec![0u32; s.machines.len()];
    for (si, v) in paused.iter().enumerate() {
        for &idx in v {
            if let Some(m) = at.get(idx) {
                promised[m] += i64::from(services[si].vcpus);
                standing[m] += 1;
            }
        }
    }
    room.build_index();
    for &si in order {
        let svc = &services[si];
        // Not while it serves a rise (above the least of the scale-in window, with headroom):
        // a boot then takes CPU from the instances that serve the rise, and when the rise
        // passes its scale-in makes standbys of those instances anyway.
        let low = svc
            .demand
            .iter()
            .rev()
            .take(c.scale_in_window.max(1))
            .filter(|d| d.is_finite())
            .fold(f64::INFINITY, |a, b| a.min(*b));
        if demand_now(svc) > low * c.headroom {
            continue;
        }
        let (mem, cpu) = (i64::from(svc.memory_mib), i64::from(svc.vcpus));
        for _ in paused[si].len()..standby[si] as usize {
            let takeable = |m: usize| {
                room.free[m].vcpus
                    + running[m]
                        .iter()
                        .filter(|(p, _)| *p < svc.priority)
                        .map(|(_, c)| c)
                        .sum::<i64>()
                    - promised[m]
            };
            let best = room
                .index
                .range((false, mem, i64::MIN, 0)..(true, i64::MIN, i64::MIN, 0))
                .take(STANDBY_CANDIDATES)
                .filter(|k| room.count[k.3] > standing[k.3])
                .map(|k| (takeable(k.3), k.3))
                .filter(|(t, _)| *t >= cpu)
                .max_by_key(|&(t, m)| (t, std::cmp::Reverse(m)));
            let Some((_, m)) = best else {
                break;
            };
            room.take_paused(m, svc);
            room.touched[m] = true;
            promised[m] += cpu;
            standing[m] += 1;
            actions.push(Action::Prepare {
                service: si,
                machine: m,
                reason: format!(
                    "warm standby: {} rose by up to {:.1} req/s recently; keep {} paused",
                    svc.name, svc.spike_rps, standby[si]
                )
                .into(),
            });
        }
    }
}

/// Running instances of priorities below `svc` on machine `m` whose pausing frees the CPU one
/// instance of `svc` needs there, lowest priority first, as (service, position in `kept`).
fn cpu_from_lower(
    s: &Snapshot,
    at: &Where,
    lower: &[usize],
    kept: &[Vec<usize>],
    room: &Room,
    m: usize,
    svc: &Service,
) -> Option<Vec<(usize, usize)>> {
    let mut free = room.free.get(m)?.vcpus;
    let mut out = Vec::new();
    for &li in lower.iter().rev() {
        let low = &s.services[li];
        if low.priority >= svc.priority {
            continue;
        }
        // Positions from the end, so that swap_remove in this order keeps the others valid.
        for (k, &idx) in kept[li].iter().enumerate().rev() {
            if free >= i64::from(svc.vcpus) {
                return Some(out);
            }
            if at.get(idx) == Some(m) && !at.starting(idx) {
                free += i64::from(low.vcpus);
                out.push((li, k));
            }
        }
    }
    (free >= i64::from(svc.vcpus)).then_some(out)
}

/// The machine of every instance, in a compact array (looked up at random 100,000s of times a
/// tick: the snapshot's instances are too big to stay in cache).
/// The top bit marks an instance that is still starting.
struct Where(Vec<u32>);

const STARTING_BIT: u32 = 1 << 31;

impl Where {
    fn get(&self, idx: usize) -> Option<usize> {
        match self.0.get(idx) {
            Some(&m) if m != u32::MAX => Some((m & !STARTING_BIT) as usize),
            _ => None,
        }
    }

    fn starting(&self, idx: usize) -> bool {
        self.0
            .get(idx)
            .is_some_and(|&m| m != u32::MAX && m & STARTING_BIT != 0)
    }
}

/// The instances of one service per machine, in a scratch array reused from service to service
/// (no hashing on the hot path).
struct Spread {
    count: Vec<u32>,
    dirty: Vec<usize>,
}

impl Spread {
    fn new(machines: usize) -> Self {
        Self {
            count: vec![0; machines],
            dirty: Vec::new(),
        }
    }

    /// Counts `instances` (and forgets the previous service).
    fn load(&mut self, at: &Where, instances: &[usize]) {
        for m in self.dirty.drain(..) {
            self.count[m] = 0;
        }
        for &idx in instances {
            if let Some(m) = at.get(idx) {
                self.add(m);
            }
        }
    }

    fn add(&mut self, m: usize) {
        if self.count[m] == 0 {
            self.dirty.push(m);
        }
        self.count[m] += 1;
    }

    fn get(&self, m: usize) -> u32 {
        self.count.get(m).copied().unwrap_or(0)
    }

    /// Machines that run the service.
    fn machines(&self) -> usize {
        self.dirty.len()
    }
}

/// Instances of one lower-priority service looked at (from its least valuable end) for a slot
/// that makes room: bounds the work when shapes differ and nothing fits.
const EVICTION_LOOKS: usize = 32;

/// Server drop: suspends one running instance of the lowest priority below `svc` whose slot
/// makes room for `svc` (an instance at least as big frees enough anywhere; a smaller one only
/// where some room is free already — a few candidates are looked at). Returns that machine.
fn make_room(
    s: &Snapshot,
    at: &Where,
    lower: &[usize],
    kept: &mut [Vec<usize>],
    room: &mut Room,
    svc: &Service,
    actions: &mut Vec<Action>,
) -> Option<usize> {
    for &li in lower.iter().rev() {
        let low = &s.services[li];
        if low.priority >= svc.priority || kept[li].is_empty() {
            continue;
        }
        let fits = |m: usize| {
            let f = room.free[m];
            f.vcpus + i64::from(low.vcpus) >= i64::from(svc.vcpus)
                && f.memory + i64::from(low.memory_mib) >= i64::from(svc.memory_mib)
        };
        // Any instance whose slot makes room, looked at from the end of the list (after a
        // scale-in the best instances are at the front, the others in no order).
        let n = kept[li].len();
        let slot = (n.saturating_sub(EVICTION_LOOKS)..n)
            .rev()
            .find(|&pos| at.get(kept[li][pos]).is_some_and(fits));
        let Some(pos) = slot else {
            continue;
        };
        let idx = kept[li].swap_remove(pos);
        let m = at.get(idx)?;
        room.give(m, low);
        actions.push(Action::Suspend {
            instance: idx,
            reason: format!(
                "server drop: make room for {} (priority {} over {})",
                svc.name, svc.priority, low.priority
            )
            .into(),
        });
        return Some(m);
    }
    None
}

/// Moves one instance off each machine whose measured CPU load is above `hot_above`, onto a
/// cool machine in use with room.
fn relieve_hot(
    s: &Snapshot,
    c: &Config,
    kept: &[Vec<usize>],
    room: &mut Room,
    budget: &mut usize,
    actions: &mut Vec<Action>,
) {
    let hot: Vec<usize> = (0..s.machines.len())
        .filter(|&m| s.machines[m].cpu_load > c.hot_above && room.count[m] > 1 && !room.touched[m])
        .collect();
    if !hot.is_empty() {
        room.build_index();
    }
    for m in hot {
        if *budget == 0 {
            return;
        }
        let Some((si, idx)) = kept.iter().enumerate().find_map(|(si, v)| {
            v.iter()
                .find(|&&idx| {
                    s.instances.get(idx).is_some_and(|i| {
                        i.machine == Some(m) && i.state == InstanceState::Running && !i.pinned
                    })
                })
                .map(|&idx| (si, idx))
        }) else {
            continue;
        };
        let svc = &s.services[si];
        let cool = room
            .index
            .range((false, i64::from(svc.memory_mib), i64::MIN, 0)..(true, i64::MIN, i64::MIN, 0))
            .find(|k| {
                k.2 >= i64::from(svc.vcpus)
                    && k.3 != m
                    && s.machines[k.3].cpu_load < c.hot_above * 0.7
            })
            .map(|k| k.3);
        let Some(to) = cool else {
            continue;
        };
        room.give(m, svc);
        room.take(to, svc);
        room.touched[m] = true;
        room.touched[to] = true;
        *budget -= 1;
        actions.push(Action::Migrate {
            instance: idx,
            to,
            reason: format!(
                "relieve {}: CPU {:.0}% is above {:.0}%",
                s.machines[m].name,
                s.machines[m].cpu_load * 100.0,
                c.hot_above * 100.0
            )
            .into(),
        });
    }
}

/// Empties the emptiest machines in use onto the others, within `budget` moves, while the
/// machines in use are cool. A machine is emptied whole or not at all; touched machines (that
/// start something or were given an instance this tick) are left alone.
#[allow(clippy::too_many_arguments)]
fn consolidate(
    s: &Snapshot,
    c: &Config,
    at: &Where,
    kept: &[Vec<usize>],
    paused: &[Vec<usize>],
    room: &mut Room,
    mut budget: usize,
    actions: &mut Vec<Action>,
) {
    if budget == 0 {
        return;
    }
    let (mut total, mut free) = (0i64, 0i64);
    let mut victims: Vec<usize> = Vec::new();
    let mut paused_on = vec![0u32; s.machines.len()];
    for &idx in paused.iter().flatten() {
        if let Some(m) = at.get(idx) {
            paused_on[m] += 1;
        }
    }
    let running_on = |m: usize| room.count[m].saturating_sub(paused_on[m]);
    for (m, machine) in s.machines.iter().enumerate() {
        if room.count[m] > 0 {
            total += i64::from(machine.memory_mib);
            free += room.free[m].memory;
            if !room.touched[m] && room.usable[m] && running_on(m) as usize <= budget {
                victims.push(m);
            }
        }
    }
    if total == 0 || (total - free) as f64 / total as f64 >= c.consolidate_below {
        return;
    }
    victims.sort_by_key(|&m| (running_on(m), std::cmp::Reverse(room.free[m].memory), m));
    victims.truncate(CONSOLIDATION_TRIES);
    // The kept instances of those machines, in one scan.
    let mut slot = vec![usize::MAX; s.machines.len()];
    for (k, &m) in victims.iter().enumerate() {
        slot[m] = k;
    }
    // (service, instance, a paused standby) per victim.
    let mut on: Vec<Vec<(usize, usize, bool)>> = vec![Vec::new(); victims.len()];
    for (list, standby) in [(kept, false), (paused, true)] {
        for (si, v) in list.iter().enumerate() {
            for &idx in v {
                if let Some(m) = at.get(idx) {
                    if slot[m] != usize::MAX {
                        on[slot[m]].push((si, idx, standby));
                    }
                }
            }
        }
    }
    let mut received = vec![false; s.machines.len()];
    let mut same = Spread::new(s.machines.len());
    for (victim, instances) in victims.into_iter().zip(on) {
        // Only settled instances move (not one paused or started this tick), never a pinned one.
        let settled = |&(_, idx, standby): &(usize, usize, bool)| {
            let i = &s.instances[idx];
            !i.pinned
                && i.state
                    == if standby {
                        InstanceState::Paused
                    } else {
                        InstanceState::Running
                    }
        };
        // Moving a paused standby costs no CPU and little time: only running ones count
        // against the budget.
        let running = instances.iter().filter(|x| !x.2).count();
        if running > budget || received[victim] || !instances.iter().all(settled) {
            continue;
        }
        // Running instances move; paused standbys there are let go (the standby pass makes
        // new ones where CPU can be had: a fresh standby costs a boot, not a migration).
        let mut moves: Vec<(usize, usize, usize)> = Vec::new();
        for &(si, idx, _) in instances.iter().filter(|x| !x.2) {
            let svc = &s.services[si];
            same.load(at, &kept[si]);
            let fit = Fit {
                avoid: Some(victim),
                only_used: true,
                // A spread service on two machines must not end up on one.
                only_new: svc.spread && same.machines() <= 2,
                paused: false,
            };
            let Some(to) = room.best_fit(svc, &same, fit) else {
                break;
            };
            room.give(victim, svc);
            room.take(to, svc);
            moves.push((si, idx, to));
        }
        if moves.len() < running {
            for (si, _, to) in moves {
                let svc = &s.services[si];
                room.give(to, svc);
                room.take(victim, svc);
            }
            continue;
        }
        budget -= running;
        let why: Reason = format!(
            "consolidate: empty {} so it can be powered down",
            s.machines[victim].name
        )
        .into();
        for (_, idx, to) in moves {
            received[to] = true;
            actions.push(Action::Migrate {
                instance: idx,
                to,
                reason: why.clone(),
            });
        }
        for &(si, idx, _) in instances.iter().filter(|x| x.2) {
            room.give_paused(victim, &s.services[si]);
            actions.push(Action::Discard {
                instance: idx,
                reason: why.clone(),
            });
        }
        if budget == 0 {
            return;
        }
    }
}

/// The one placement: the machine `decide` would pick for one more instance of `service` —
/// best-fit on the machines in use, spread, an empty machine last — never `avoid`. The
/// controller uses it wherever a machine is not named (an operator's activate or resume,
/// manual mode, waking and draining). `None`: no dedicated, healthy machine has room.
pub fn place(s: &Snapshot, service: usize, avoid: Option<usize>) -> Option<usize> {
    let svc = s.services.get(service)?;
    let mut room = Room::new(&s.machines);
    let mut at = Where(vec![u32::MAX; s.instances.len()]);
    let mut mine = Vec::new();
    for (idx, i) in s.instances.iter().enumerate() {
        let (Some(m), Some(of)) = (i.machine, s.services.get(i.service)) else {
            continue;
        };
        if m >= s.machines.len() {
            continue;
        }
        match i.state {
            InstanceState::Starting | InstanceState::Running => room.take(m, of),
            InstanceState::Paused => room.take_paused(m, of),
            InstanceState::Suspended | InstanceState::Failed => continue,
        }
        if i.service == service && i.state != InstanceState::Paused {
            at.0[idx] = m as u32;
            mine.push(idx);
        }
    }
    let mut same = Spread::new(s.machines.len());
    same.load(&at, &mine);
    let fit = Fit {
        avoid,
        ..Fit::default()
    };
    room.best_fit(svc, &same, fit)
}

/// What `actions` do to `s`, at once (the simulator adds the time each takes). New instances
/// start in `Starting` (prepared standbys in `Paused`) with ids from `new_id(service name)`; discarded ones are removed last, so
/// every index in the plan refers to `s` as it was.
pub fn apply(s: &mut Snapshot, actions: &[Action], mut new_id: impl FnMut(&str) -> String) {
    let mut gone: Vec<usize> = Vec::new();
    for a in actions {
        match *a {
            Action::Activate {
                service, machine, ..
            }
            | Action::Prepare {
                service, machine, ..
            } => {
                let name = s.services.get(service).map_or("", |x| x.name.as_str());
                let id = new_id(name);
                s.instances.push(crate::Instance {
                    id,
                    service,
                    machine: Some(machine),
                    // A prepared standby is paused once booted (the simulator times the boot).
                    state: if matches!(a, Action::Prepare { .. }) {
                        InstanceState::Paused
                    } else {
                        InstanceState::Starting
                    },
                    pinned: false,
                });
            }
            Action::Pause { instance, .. } | Action::Unpause { instance, .. } => {
                if let Some(i) = s.instances.get_mut(instance) {
                    i.state = if matches!(a, Action::Pause { .. }) {
                        InstanceState::Paused
                    } else {
                        InstanceState::Running
                    };
                }
            }
            Action::Resume {
                instance, machine, ..
            } => {
                if let Some(i) = s.instances.get_mut(instance) {
                    i.machine = Some(machine);
                    i.state = InstanceState::Starting;
                }
            }
            Action::Suspend { instance, .. } => {
                if let Some(i) = s.instances.get_mut(instance) {
                    i.machine = None;
                    i.state = InstanceState::Suspended;
                }
            }
            Action::Migrate { instance, to, .. } => {
                if let Some(i) = s.instances.get_mut(instance) {
                    i.machine = Some(to);
                }
            }
            Action::Discard { instance, .. } => gone.push(instance),
            Action::Drop { service, .. } | Action::Undrop { service, .. } => {
                if let Some(x) = s.services.get_mut(service) {
                    x.dropped = matches!(a, Action::Drop { .. });
                }
            }
        }
    }
    remove_indices(&mut s.instances, &mut gone);
}

/// Removes the elements at `gone` (any order, repeats allowed) in one pass, keeping the order of
/// the rest: what [`apply`] does to the instances a plan discards, for callers that keep data
/// beside them index for index.
pub fn remove_indices<T>(v: &mut Vec<T>, gone: &mut Vec<usize>) {
    if gone.is_empty() {
        return;
    }
    gone.sort_unstable();
    gone.dedup();
    // What comes before the first removal stays where it is.
    let first = gone[0];
    let mut write = first;
    let mut next = 0;
    for read in first..v.len() {
        if gone.get(next) == Some(&read) {
            next += 1;
            continue;
        }
        v.swap(write, read);
        write += 1;
    }
    v.truncate(write.min(v.len()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_indices_keeps_the_order_of_the_rest_and_ignores_repeats() {
        let mut v: Vec<char> = "abcdef".chars().collect();
        remove_indices(&mut v, &mut vec![4, 0, 4, 2]);
        assert_eq!(v, vec!['b', 'd', 'f']);
        remove_indices(&mut v, &mut Vec::new());
        assert_eq!(v.len(), 3);
    }
}
