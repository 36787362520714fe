//! The dashboard at `/`: the same data as `/api/v1/status`, for a person paged at 3 a.m.
//!
//! Rendered on the server into one self-contained page (no CDN, no script needed to see it:
//! it works offline, through `curl`, and in a headless browser's DOM dump) that reloads itself
//! every five seconds. Per probe: a status and why; per stage p50/p95, last success, in-flight
//! count and oldest age; a waterfall of the last 50 canaries; recent failures with their text.

use std::fmt::Write;

use crate::{
    canary::life::{Canary, Outcome, Stage},
    flow::{
        engine::ProbeStatus,
        history::{self, Counts, StageHistory},
    },
};

/// Escapes text for HTML element content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `1.23 s`, `450 ms`, `3.5 min`, `2.0 h`.
fn dur(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..120_000 => format!("{:.2} s", ms as f64 / 1000.0),
        120_000..7_200_000 => format!("{:.1} min", ms as f64 / 60_000.0),
        _ => format!("{:.1} h", ms as f64 / 3_600_000.0),
    }
}

fn ago(now: u64, at: u64) -> String {
    format!("{} ago", dur(now.saturating_sub(at)))
}

const STYLE: &str = r#"
:root { --ok:#1a7f37; --warn:#9a6700; --bad:#cf222e; --muted:#57606a; --line:#d0d7de; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1f2328; }
h1 { font-size: 1.3rem; margin: 0 0 1rem; }
h2 { font-size: 1.15rem; margin: 0; display: flex; gap: .6rem; align-items: center; }
h3 { font-size: .95rem; margin: 1rem 0 .4rem; color: var(--muted); }
section.probe { border: 1px solid var(--line); border-radius: 8px; padding: 1rem; margin-bottom: 1.5rem; }
.badge { font-size: .8rem; padding: .1rem .55rem; border-radius: 1rem; color: #fff; text-transform: uppercase; }
.badge.ok { background: var(--ok); } .badge.degraded { background: var(--warn); } .badge.failing { background: var(--bad); }
.why { margin: .4rem 0 0; font-weight: 600; color: var(--bad); }
table { border-collapse: collapse; }
td, th { padding: .2rem .7rem .2rem 0; text-align: left; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 500; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.overdue { color: var(--bad); font-weight: 600; }
.wf { width: 100%; }
.wf td.track { width: 60%; position: relative; }
.wf td.route { font-size: 85%; white-space: nowrap; }
.wf td.route.plaintext { color: #b00; }
.bar { position: absolute; top: 4px; height: 12px; border-radius: 2px; min-width: 2px; }
.bar.submit { background: #8250df; } .bar.import { background: #0969da; }
.bar.reply { background: #1a7f37; } .bar.delivery { background: #bf8700; }
.bar.late { outline: 2px solid var(--bad); } .bar.failed { background: var(--bad); }
.bar.open { opacity: .45; }
.legend span { display: inline-block; margin-right: 1rem; }
.legend i { display: inline-block; width: 10px; height: 10px; margin-right: .3rem; border-radius: 2px; }
.out-on_time { color: var(--ok); } .out-late { color: var(--warn); }
.out-failed, .out-lost { color: var(--bad); } .out-in_flight { color: var(--muted); }
footer { color: var(--muted); }
div.track { position: relative; height: 20px; min-width: 12rem; background: #f6f8fa; }
.bar.held { background: var(--bad); } .bar.draining { background: var(--warn); }
.bar.clearing { background: var(--ok); opacity: .5; }
svg.latency { background: #f6f8fa; }
svg.latency text, svg.hourly text { font: 10px system-ui, sans-serif; fill: var(--muted); }
svg.latency .grid { stroke: var(--line); stroke-width: 1; }
svg.latency polyline { fill: none; stroke-width: 1.5; }
svg.latency .p50 { stroke: #0969da; fill: #0969da; } svg.latency .p95 { stroke: #bf8700; fill: #bf8700; }
svg.latency polyline.p95 { stroke-dasharray: 4 2; fill: none; } svg.latency polyline.p50 { fill: none; }
svg.hourly rect.none { fill: #eaeef2; } svg.hourly rect.good { fill: var(--ok); }
svg.hourly rect.fair { fill: #d4a72c; } svg.hourly rect.poor { fill: var(--bad); }
.k50 { color: #0969da; } .k95 { color: #bf8700; }
"#;

fn outcome(c: &Canary) -> (&'static str, &'static str) {
    match c.outcome {
        None => ("in_flight", "in flight"),
        Some(Outcome::OnTime) => ("on_time", "on time"),
        Some(Outcome::Late) => ("late", "late"),
        Some(Outcome::Failed) => ("failed", "failed"),
        Some(Outcome::Lost) => ("lost", "lost"),
    }
}

/// A deadline cell: `2 s`, or `357 ms (learned)` for an `"auto"` one.
fn deadline(ms: Option<u64>, learned: bool) -> String {
    match (ms, learned) {
        (Some(ms), true) => format!("{} (learned)", dur(ms)),
        (Some(ms), false) => dur(ms),
        (None, _) => "–".into(),
    }
}

fn stage_table(out: &mut String, p: &ProbeStatus, now: u64) {
    out.push_str(
        "<h3>Stages</h3><table class=\"stages\"><tr><th>stage</th><th>p50</th><th>p95</th>\
         <th>deadline</th><th>last success</th><th>in flight</th><th>oldest in flight</th></tr>",
    );
    for s in &p.stages {
        let opt = |v: Option<u64>| v.map(dur).unwrap_or_else(|| "–".into());
        let oldest = opt(s.oldest_in_flight_ms);
        let _ = write!(
            out,
            "<tr class=\"stage\" data-stage=\"{st}\"><td>{st}</td><td class=\"num\">{p50}</td>\
             <td class=\"num\">{p95}</td><td class=\"num\">{deadline}</td><td>{last}</td>\
             <td class=\"num\">{n}</td><td class=\"num\">{oldest}</td></tr>",
            st = s.stage,
            p50 = opt(s.p50_ms),
            p95 = opt(s.p95_ms),
            deadline = deadline(s.deadline_ms, s.learned_deadline_ms.is_some()),
            last = s
                .last_success_ms
                .map(|t| ago(now, t))
                .unwrap_or_else(|| "never (recently)".into()),
            n = s.in_flight,
        );
    }
    out.push_str("</table>");
    // A held backlog, said in words: how far the drain has got and how long it has left.
    for s in &p.stages {
        let Some(b) = &s.backlog else { continue };
        let line = match (b.reached_ms, b.eta_ms) {
            (Some(reached), Some(eta)) => format!(
                "draining: caught up to {} ({} behind), about {} left",
                clock_time(reached),
                dur(b.behind_ms),
                dur(eta)
            ),
            (Some(reached), None) => format!(
                "draining: caught up to {} ({} behind), not catching up yet",
                clock_time(reached),
                dur(b.behind_ms)
            ),
            (None, _) => format!(
                "stalled: {} canaries past the deadline, {} behind, nothing getting through",
                s.overdue,
                dur(b.behind_ms)
            ),
        };
        let _ = write!(
            out,
            "<p class=\"backlog\" data-stage=\"{st}\"><strong>{st}</strong> {line}</p>",
            st = s.stage
        );
    }
}

const CHART_W: f64 = 480.0;
const CHART_H: f64 = 84.0;
const DAY_MS: u64 = 24 * 3_600_000;

/// `99.31 % of 1234`, or a dash with nothing measured.
fn availability(c: &Counts) -> String {
    match c.availability() {
        None => "–".into(),
        Some(a) => format!("{:.2} % of {}", a * 100.0, c.ok + c.bad),
    }
}

/// A wall-clock time, UTC, in `fmt`.
fn wall_time(wall_ms: u64, fmt: &str) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(wall_ms as i64)
        .map(|t| t.format(fmt).to_string())
        .unwrap_or_default()
}

/// The smallest round duration (1, 2, 5 in ms steps; 1, 2, 5, 10, 15, 30 s and min; 1, 2, 3,
/// 6, 12, 24 h; then whole days) that is at least `ms`: the top of a latency chart.
fn round_up(ms: u64) -> u64 {
    const S: u64 = 1_000;
    const M: u64 = 60 * S;
    const H: u64 = 60 * M;
    const STEPS: [u64; 27] = [
        1,
        2,
        5,
        10,
        20,
        50,
        100,
        200,
        500,
        S,
        2 * S,
        5 * S,
        10 * S,
        15 * S,
        30 * S,
        M,
        2 * M,
        5 * M,
        10 * M,
        15 * M,
        30 * M,
        H,
        2 * H,
        3 * H,
        6 * H,
        12 * H,
        24 * H,
    ];
    STEPS
        .into_iter()
        .find(|s| *s >= ms)
        .unwrap_or_else(|| ms.div_ceil(24 * H) * 24 * H)
}

/// The last 24 h of a stage's latency as an SVG line chart: p50 solid, p95 dashed, a point
/// per 10-minute bin with a measurement (its tooltip says the figures), a line between
/// neighbouring bins only, so a gap in the data is a gap in the line.
fn latency_svg(out: &mut String, h: &StageHistory, now_wall: u64) {
    let from = (now_wall + 1).saturating_sub(DAY_MS);
    let scale = round_up(
        h.latency_24h
            .iter()
            .map(|p| p.p95_ms)
            .max()
            .unwrap_or(0)
            .max(1),
    );
    let (left, bottom) = (44.0, CHART_H - 14.0);
    let span = CHART_W - left;
    let x = |t: u64| {
        left + (t.saturating_sub(from) as f64 + history::BIN_MS as f64 / 2.0) * span / DAY_MS as f64
    };
    let y = |ms: u64| bottom - ms as f64 * (bottom - 4.0) / scale as f64;
    let _ = write!(
        out,
        r#"<svg class="latency" data-stage="{st}" width="{CHART_W}" height="{CHART_H}" viewBox="0 0 {CHART_W} {CHART_H}" role="img" aria-label="{st} latency, last 24 h"><line class="grid" x1="{left}" y1="{bottom}" x2="{CHART_W}" y2="{bottom}"/><line class="grid" x1="{left}" y1="4" x2="{CHART_W}" y2="4"/><text x="{tx}" y="12" text-anchor="end">{max}</text><text x="{tx}" y="{bottom}" text-anchor="end">0</text>"#,
        st = h.stage,
        tx = left - 4.0,
        max = dur(scale),
    );
    // A tick every 6 hours of the wall clock.
    let six = 6 * 3_600_000;
    let mut tick = from.div_ceil(six) * six;
    while tick <= now_wall {
        let tx = left + (tick - from) as f64 * span / DAY_MS as f64;
        let _ = write!(
            out,
            r#"<line class="grid" x1="{tx:.1}" y1="4" x2="{tx:.1}" y2="{bottom}"/><text x="{tx:.1}" y="{ly}" text-anchor="middle">{label}</text>"#,
            ly = CHART_H - 2.0,
            label = wall_time(tick, "%H:%M"),
        );
        tick += six;
    }
    for class in ["p95", "p50"] {
        let value = |p: &history::Point| if class == "p50" { p.p50_ms } else { p.p95_ms };
        let mut run: Vec<String> = Vec::new();
        let flush = |run: &mut Vec<String>, out: &mut String| {
            if run.len() > 1 {
                let _ = write!(
                    out,
                    r#"<polyline class="{class}" points="{}"/>"#,
                    run.join(" ")
                );
            }
            run.clear();
        };
        let mut prev: Option<u64> = None;
        for p in &h.latency_24h {
            if prev.is_some_and(|t| p.start_ms != t + history::BIN_MS) {
                flush(&mut run, out);
            }
            run.push(format!("{:.1},{:.1}", x(p.start_ms), y(value(p))));
            prev = Some(p.start_ms);
        }
        flush(&mut run, out);
    }
    for p in &h.latency_24h {
        let tip = format!(
            "{} UTC: p50 {}, p95 {}, {} measured",
            wall_time(p.start_ms, "%H:%M"),
            dur(p.p50_ms),
            dur(p.p95_ms),
            p.n
        );
        for (class, v) in [("p95", p.p95_ms), ("p50", p.p50_ms)] {
            let _ = write!(
                out,
                r#"<circle class="point {class}" cx="{:.1}" cy="{:.1}" r="2.2"><title>{}</title></circle>"#,
                x(p.start_ms),
                y(v),
                esc(&tip)
            );
        }
    }
    if h.latency_24h.is_empty() {
        let _ = write!(
            out,
            r#"<text x="{:.0}" y="{:.0}" text-anchor="middle">nothing measured in 24 h</text>"#,
            left + span / 2.0,
            CHART_H / 2.0
        );
    }
    out.push_str("</svg>");
}

/// The last 7 days by the hour: one cell per hour, green when every canary passed the stage
/// on time, amber from 99 %, red below, grey with nothing measured.
fn hourly_svg(out: &mut String, h: &StageHistory) {
    let w = 2.0;
    let width = h.hourly_7d.len() as f64 * w;
    let _ = write!(
        out,
        r#"<svg class="hourly" data-stage="{st}" width="{width}" height="16" viewBox="0 0 {width} 16" role="img" aria-label="{st} on time by the hour, last 7 d">"#,
        st = h.stage,
    );
    for (i, (start, c)) in h.hourly_7d.iter().enumerate() {
        let class = match c.availability() {
            None => "none",
            Some(a) if a >= 1.0 => "good",
            Some(a) if a >= 0.99 => "fair",
            Some(_) => "poor",
        };
        let _ = write!(
            out,
            r#"<rect class="{class}" x="{:.0}" y="0" width="{w}" height="16"><title>{} UTC: {}</title></rect>"#,
            i as f64 * w,
            wall_time(*start, "%a %H:00"),
            availability(c)
        );
    }
    out.push_str("</svg>");
}

/// Per stage: latency over 24 h, and the share of canaries that passed it on time over
/// 24 h and 7 d, from the history kept in the ledger.
fn history_table(out: &mut String, stages: &[StageHistory], now_wall: u64) {
    out.push_str(
        r#"<h3>History</h3><table class="history"><tr><th>stage</th><th>latency, last 24 h (<span class="k50">p50</span>, <span class="k95">p95</span> dashed; per 10 min)</th><th>on time, 24 h</th><th>on time, 7 d</th><th>by the hour, 7 d</th></tr>"#,
    );
    for h in stages {
        let _ = write!(
            out,
            r#"<tr class="history" data-stage="{st}"><td>{st}</td><td>"#,
            st = h.stage
        );
        latency_svg(out, h, now_wall);
        let _ = write!(
            out,
            r#"</td><td class="num avail-24h">{}</td><td class="num avail-7d">{}</td><td>"#,
            availability(&h.counts_24h),
            availability(&h.counts_7d)
        );
        hourly_svg(out, h);
        out.push_str("</td></tr>");
    }
    out.push_str("</table>");
}

/// The recorded incidents, newest first, each with a timeline bar: held (from the latest
/// possible onset to the stage resuming), draining (to the last held canary through), and
/// clearing (to the first on-time canary).
fn incident_table(out: &mut String, incidents: &[crate::flow::incident::Incident], now: u64) {
    out.push_str("<section class=\"incidents\"><h2>Incidents</h2>");
    if incidents.is_empty() {
        out.push_str("<p>None recorded.</p></section>");
        return;
    }
    out.push_str(
        "<table class=\"incidents\"><tr><th>probe</th><th>#</th><th>stage</th><th>detected</th>\
         <th>state</th><th>held / late / lost</th><th>largest delay</th><th>timeline</th></tr>",
    );
    for i in incidents.iter().take(20) {
        let start = i.onset_before_ms.min(i.detected_ms);
        let end = i.cleared_ms.or(i.drained_ms).unwrap_or(now).max(start + 1);
        let pct = |t: u64| (t.clamp(start, end) - start) as f64 * 100.0 / (end - start) as f64;
        let resumed = i.resumed_ms.unwrap_or(end);
        let drained = i.drained_ms.unwrap_or(end);
        let state = match (i.resumed_ms, i.drained_ms) {
            (_, Some(_)) => "closed",
            (Some(_), None) => "draining",
            (None, None) => "open",
        };
        let _ = write!(
            out,
            "<tr class=\"incident\" data-state=\"{state}\"><td>{probe}</td><td>{id}</td>\
             <td>{stage} ({reason})</td><td>{det}</td><td>{state}</td>\
             <td class=\"num\">{held} / {late} / {lost}</td><td class=\"num\">{max}</td>\
             <td><div class=\"track\" title=\"held, draining, clearing\">\
             <span class=\"bar held\" style=\"left:0%;width:{w1:.1}%\"></span>\
             <span class=\"bar draining\" style=\"left:{l2:.1}%;width:{w2:.1}%\"></span>\
             <span class=\"bar clearing\" style=\"left:{l3:.1}%;width:{w3:.1}%\"></span>\
             </div></td></tr>",
            probe = esc(&i.probe),
            id = i.id,
            stage = i.stage,
            reason = i.reason,
            det = ago(now, i.detected_ms),
            held = i.held,
            late = i.late,
            lost = i.lost,
            max = dur(i.max_delay_ms),
            w1 = pct(resumed),
            l2 = pct(resumed),
            w2 = pct(drained) - pct(resumed),
            l3 = pct(drained),
            w3 = 100.0 - pct(drained),
        );
    }
    out.push_str(
        "</table><p class=\"muted\">Postmortem notes: <code>mailcanary incidents --format markdown \
         --url http://THIS-ADDRESS</code>; JSON at <a href=\"/api/v1/incidents\">/api/v1/incidents</a>.</p></section>",
    );
}

/// A canary time as the wall clock's time of day, UTC.
fn clock_time(canary_ms: u64) -> String {
    let wall = crate::clock::to_wall_ms(canary_ms);
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(wall as i64)
        .map(|t| t.format("%H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// One waterfall row: a bar per stage, positioned on a shared time scale.
fn waterfall_row(out: &mut String, c: &Canary, now: u64, scale_ms: u64) {
    let (class, label) = outcome(c);
    let end = c.finished_ms.unwrap_or(now);
    let mut bars = String::new();
    let mut tip = Vec::new();
    for (stage, r) in &c.stages {
        if *stage == Stage::EndToEnd {
            continue;
        }
        let Some(start) = r.started_ms else { continue };
        let stop = r
            .done_ms
            .or(r.failed.as_ref().map(|f| f.at_ms))
            .unwrap_or(end);
        let left = start.saturating_sub(c.created_ms) as f64 * 100.0 / scale_ms as f64;
        let width = stop.saturating_sub(start) as f64 * 100.0 / scale_ms as f64;
        let mut classes = vec![stage.as_str()];
        if r.overdue {
            classes.push("late");
        }
        if r.failed.is_some() {
            classes.push("failed");
        }
        if r.done_ms.is_none() && r.failed.is_none() {
            classes.push("open");
        }
        let what = match (&r.failed, r.done_ms, r.overdue) {
            (Some(f), _, _) => format!("{stage}: failed ({}) {}", f.reason, f.detail),
            (None, Some(_), true) => format!("{stage}: {} (late)", dur(stop.saturating_sub(start))),
            (None, Some(_), false) => format!("{stage}: {}", dur(stop.saturating_sub(start))),
            (None, None, o) => format!(
                "{stage}: in flight {}{}",
                dur(stop.saturating_sub(start)),
                if o { " OVERDUE" } else { "" }
            ),
        };
        let _ = write!(
            bars,
            "<div class=\"bar {cls}\" style=\"left:{left:.2}%;width:{width:.2}%\" title=\"{t}\"></div>",
            cls = classes.join(" "),
            left = left.min(100.0),
            width = width.min(100.0 - left.min(100.0)),
            t = esc(&what),
        );
        tip.push(what);
    }
    let _ = write!(
        out,
        "<tr class=\"canary\"><td><code>{id}</code></td><td class=\"out-{class}\">{label}</td>\
         <td class=\"num\">{total}</td><td class=\"track\" title=\"{tip}\">{bars}</td>",
        id = esc(&c.id),
        total = dur(end.saturating_sub(c.created_ms)),
        tip = esc(&tip.join("; ")),
    );
    route_cell(out, c.route.as_ref());
    out.push_str("</tr>");
}

/// The delivered mail's way in a waterfall row: hop count, TLS, the verdicts reported; each
/// hop in the title.
fn route_cell(out: &mut String, route: Option<&crate::canary::hops::Route>) {
    let Some(route) = route else {
        out.push_str("<td class=\"route\"></td>");
        return;
    };
    let hops: Vec<String> = route
        .hops
        .iter()
        .enumerate()
        .map(|(i, h)| {
            format!(
                "hop {}: {} by {} with {}{}{}{}",
                i + 1,
                h.delay_ms.map_or("?".into(), dur),
                h.by.as_deref().unwrap_or("?"),
                h.protocol.as_deref().unwrap_or("?"),
                h.tls
                    .as_deref()
                    .map(|t| format!(" {t}"))
                    .unwrap_or_default(),
                if h.plaintext { " PLAINTEXT" } else { "" },
                if h.skew_ms > 0 {
                    format!(" (clock {} behind)", dur(h.skew_ms))
                } else {
                    String::new()
                },
            )
        })
        .collect();
    let plaintext = route.hops.iter().filter(|h| h.plaintext).count();
    let tls = if plaintext == 0 {
        "TLS".to_string()
    } else {
        format!("{plaintext} plaintext")
    };
    let verdicts: Vec<String> = route
        .auth
        .iter()
        .map(|v| format!("{}={}", v.method.as_str(), v.result.as_str()))
        .chain(
            route
                .verified
                .iter()
                .map(|v| format!("{}(here)={}", v.method.as_str(), v.result.as_str())),
        )
        .collect();
    let _ = write!(
        out,
        "<td class=\"route{cls}\" data-hops=\"{n}\" data-tls=\"{tlsdata}\" title=\"{title}\">\
         {n} hops · {tls}{v}</td>",
        cls = if plaintext > 0 { " plaintext" } else { "" },
        n = route.hops.len(),
        tlsdata = if plaintext == 0 {
            "all_hops"
        } else {
            "some_plaintext"
        },
        title = esc(&hops.join("; ")),
        tls = esc(&tls),
        v = if verdicts.is_empty() {
            String::new()
        } else {
            esc(&format!(" · {}", verdicts.join(" ")))
        },
    );
}

/// Delivery judged per mailbox (only for a probe with several: one mailbox is the stage
/// table's delivery row).
fn mailbox_table(out: &mut String, p: &ProbeStatus, now: u64) {
    if p.mailboxes.len() < 2 {
        return;
    }
    out.push_str(
        "<h3>Delivery by mailbox</h3><table class=\"mailboxes\"><tr><th>mailbox</th>\
         <th>state</th><th>awaited</th><th>overdue</th><th>oldest</th><th>p50</th>\
         <th>deadline</th><th>last delivered</th><th>inbox / junk (recent)</th></tr>",
    );
    for m in &p.mailboxes {
        let _ = write!(
            out,
            "<tr class=\"mailbox\" data-mailbox=\"{name}\" data-state=\"{state}\"><td>{name}</td>\
             <td class=\"{state}\" title=\"{why}\">{state}</td><td class=\"num\">{n}</td>\
             <td class=\"num\">{overdue}</td><td class=\"num\">{oldest}</td>\
             <td class=\"num\">{p50}</td><td class=\"num\">{deadline}</td><td>{last}</td>\
             <td class=\"num\">{inbox} / {junk}</td></tr>",
            name = esc(&m.name),
            state = m.state,
            why = esc(&m.why),
            n = m.in_flight,
            overdue = m.overdue,
            oldest = m.oldest_in_flight_ms.map_or("-".into(), dur),
            p50 = m.p50_ms.map_or("-".into(), dur),
            deadline = deadline(m.deadline_ms, m.learned_deadline_ms.is_some()),
            last = match (m.last_delivered_ms, m.last_folder) {
                (Some(t), Some(f)) => format!("{} ({f})", ago(now, t)),
                _ => "-".into(),
            },
            inbox = m.inbox,
            junk = m.junk,
        );
    }
    out.push_str("</table>");
}

fn waterfall(out: &mut String, p: &ProbeStatus, now: u64) {
    let rows: Vec<&Canary> = p.in_flight.iter().chain(p.recent.iter()).take(50).collect();
    if rows.is_empty() {
        out.push_str("<h3>Last canaries</h3><p>No canary yet.</p>");
        return;
    }
    let scale = rows
        .iter()
        .map(|c| c.finished_ms.unwrap_or(now).saturating_sub(c.created_ms))
        .max()
        .unwrap_or(1)
        .max(1);
    let _ = write!(
        out,
        "<h3>Last {} canaries (scale {})</h3><p class=\"legend\"><span><i class=\"bar submit\" \
         style=\"position:static\"></i>submit</span><span><i class=\"bar import\" \
         style=\"position:static\"></i>import</span><span><i class=\"bar reply\" \
         style=\"position:static\"></i>reply</span><span><i class=\"bar delivery\" \
         style=\"position:static\"></i>delivery</span><span>red outline: late · red: failed · \
         faded: in flight</span></p><table class=\"wf\">",
        rows.len(),
        dur(scale)
    );
    for c in rows {
        waterfall_row(out, c, now, scale);
    }
    out.push_str("</table>");
}

fn failures(out: &mut String, p: &ProbeStatus, now: u64) {
    out.push_str("<h3>Recent failures</h3>");
    if p.failures.is_empty() && p.mailbox_error.is_none() {
        out.push_str("<p>None.</p>");
        return;
    }
    out.push_str(
        "<table class=\"failures\"><tr><th>when</th><th>canary</th><th>stage</th>\
         <th>reason</th><th>error</th></tr>",
    );
    for m in &p.mailboxes {
        for (folder, f) in &m.errors {
            let _ = write!(
                out,
                "<tr class=\"failure\"><td>{}</td><td>(mailbox {} {folder})</td><td>delivery</td>\
                 <td>{}</td><td>{}</td></tr>",
                ago(now, f.at_ms),
                esc(&m.name),
                f.reason,
                esc(&f.detail)
            );
        }
    }
    for f in &p.failures {
        let _ = write!(
            out,
            "<tr class=\"failure\"><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td>\
             <td>{}</td></tr>",
            ago(now, f.at_ms),
            esc(&f.canary),
            f.stage,
            f.reason,
            esc(&f.detail)
        );
    }
    out.push_str("</table>");
}

/// The whole page.
pub fn render(
    probes: &[ProbeStatus],
    incidents: &[crate::flow::incident::Incident],
    history: &[(String, Vec<StageHistory>)],
    now: u64,
) -> String {
    let now_wall = crate::clock::to_wall_ms(now);
    let mut out = String::with_capacity(16 * 1024);
    let worst = if probes.iter().any(|p| p.state == "failing") {
        "FAILING"
    } else if probes.iter().any(|p| p.state == "degraded") {
        "degraded"
    } else {
        "ok"
    };
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <meta http-equiv=\"refresh\" content=\"5\"><title>{worst} · mailcanary</title>\
         <style>{STYLE}</style></head><body><h1>mailcanary</h1>"
    );
    if probes.is_empty() {
        out.push_str("<p>No probe configured.</p>");
    }
    for p in probes {
        let _ = write!(
            out,
            "<section class=\"probe\" id=\"probe-{name}\" data-state=\"{state}\">\
             <h2>{name} <span class=\"badge {state}\">{state}</span></h2>",
            name = esc(&p.name),
            state = p.state,
        );
        if !p.why.is_empty() {
            let _ = write!(out, "<p class=\"why\">{}</p>", esc(&p.why));
        }
        stage_table(&mut out, p, now);
        mailbox_table(&mut out, p, now);
        if let Some((_, h)) = history.iter().find(|(name, _)| *name == p.name) {
            history_table(&mut out, h, now_wall);
        }
        waterfall(&mut out, p, now);
        failures(&mut out, p, now);
        out.push_str("</section>");
    }
    incident_table(&mut out, incidents, now);
    out.push_str(
        "<footer>Refreshes every 5 s · <a href=\"/api/v1/status\">status JSON</a> · \
         <a href=\"/metrics\">metrics</a></footer></body></html>",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_everything_that_could_be_markup() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn chart_tops_are_round() {
        assert_eq!(
            [1, 2, 3, 7, 10, 11, 450, 1_234, 20_001].map(round_up),
            [1, 2, 5, 10, 10, 20, 500, 2_000, 30_000]
        );
    }

    #[test]
    fn a_day_of_history_draws_points_lines_gaps_and_hours() {
        use crate::flow::history::{Mark, Series};
        let now = 1_780_000_000_000u64;
        let mut s = Series::default();
        // Two runs of bins 12 h apart: two line segments each for p50 and p95.
        for start in [now - 20 * 3_600_000, now - 8 * 3_600_000] {
            for i in 0..30u64 {
                s.add(
                    Stage::Import,
                    start + i * 60_000,
                    Mark::OnTime(1_000 + i * 10),
                );
            }
        }
        let h = StageHistory::of(Stage::Import, &s, now);
        let mut out = String::new();
        latency_svg(&mut out, &h, now);
        assert_eq!(
            h.latency_24h.len(),
            out.matches("circle class=\"point p50\"").count()
        );
        assert!(h.latency_24h.len() >= 6, "{:?}", h.latency_24h);
        assert_eq!(out.matches("<polyline class=\"p50\"").count(), 2, "{out}");
        assert_eq!(out.matches("<polyline class=\"p95\"").count(), 2);
        assert!(out.contains(">2.00 s</text>"), "{out}");
        let mut cells = String::new();
        hourly_svg(&mut cells, &h);
        assert_eq!(cells.matches("<rect").count(), 168);
        assert!(cells.matches("class=\"good\"").count() >= 2);
        assert_eq!(availability(&h.counts_24h), "100.00 % of 60");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(dur(450), "450 ms");
        assert_eq!(dur(1_234), "1.23 s");
        assert_eq!(dur(300_000), "5.0 min");
        assert_eq!(dur(10_800_000), "3.0 h");
    }

    /// Seen under load in `chromium_draws_the_history_and_it_survives_a_restart`: a stage whose
    /// recorded end precedes its start (the reply's arrival recorded before the run heard its
    /// POST answered) made the page panic on `stop - start` in a debug build, and print a
    /// wrapped duration in a release one.
    #[test]
    fn a_stage_that_ends_before_it_starts_renders_as_zero() {
        let mut c = Canary::new(
            "p",
            "id",
            "tok",
            "mid",
            vec![Stage::Submit, Stage::Delivery],
            crate::canary::life::tests::limits(),
            1_000,
        );
        for (stage, r) in &mut c.stages {
            if *stage == Stage::Delivery {
                r.started_ms = Some(2_000);
                r.done_ms = Some(1_900);
            }
        }
        let mut out = String::new();
        waterfall_row(&mut out, &c, 3_000, 10_000);
        assert!(out.contains("delivery: 0 ms"), "{out}");
    }

    #[test]
    fn a_delivered_canary_row_shows_its_hops_tls_and_verdicts() {
        use crate::canary::hops::{AuthMethod, AuthResult, Hop, Route, Verdict};
        let mut c = Canary::new(
            "p",
            "id",
            "tok",
            "mid",
            vec![Stage::Submit, Stage::Delivery],
            crate::canary::life::tests::limits(),
            1_000,
        );
        c.route = Some(Route {
            hops: vec![
                Hop {
                    by: Some("mx<b>".into()),
                    protocol: Some("ESMTPSA".into()),
                    tls: Some("TLSv1.3".into()),
                    delay_ms: Some(1_000),
                    ..Hop::default()
                },
                Hop {
                    protocol: Some("SMTP".into()),
                    plaintext: true,
                    ..Hop::default()
                },
            ],
            auth: vec![Verdict {
                method: AuthMethod::Dkim,
                result: AuthResult::Pass,
            }],
            untrusted_auth: 0,
            verified: Vec::new(),
        });
        let mut out = String::new();
        waterfall_row(&mut out, &c, 3_000, 10_000);
        assert!(
            out.contains("data-hops=\"2\" data-tls=\"some_plaintext\""),
            "{out}"
        );
        assert!(
            out.contains("2 hops · 1 plaintext · dkim=pass</td>"),
            "{out}"
        );
        assert!(out.contains("hop 1: 1.00 s by mx&lt;b&gt; with ESMTPSA TLSv1.3; hop 2: ? by ? with SMTP PLAINTEXT"), "{out}");
    }

    #[test]
    fn an_empty_prober_still_renders() {
        let html = render(&[], &[], &[], 0);
        assert!(html.contains("No probe configured"));
        assert!(html.ends_with("</html>"));
    }
}
