//! `cargo xtask monitor`: a live dashboard of the lab (ratatui), or `--once` as plain text.
//! `cargo xtask status` prints the same view once (or as JSON).

use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Style, Stylize};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Gauge, Paragraph};
use serde::Serialize;

use crate::lab::{Driver, Snapshot, WorkerView};

#[derive(Debug, Clone, Serialize)]
pub struct View {
    pub driver: String,
    pub snapshot: Snapshot,
    pub workers: Vec<WorkerView>,
    /// Records produced and processed so far (local lab; `None` in a cluster).
    pub records: Option<Records>,
}

/// The lab's records so far, from the workers' record logs.
#[derive(Debug, Clone, Serialize)]
pub struct Records {
    pub produced: usize,
    pub processed: usize,
    pub duplicated: usize,
    /// Produced and not (yet) processed.
    pub unprocessed: usize,
    /// Times two workers read one shard at once.
    pub overlaps: usize,
}

/// Reads the lab's state, retrying transient failures for up to `retry_for` (zero: one try;
/// the live dashboard shows a failure and reads again at its next refresh).
pub fn gather(driver: &dyn Driver, retry_for: Duration) -> anyhow::Result<View> {
    Ok(View {
        driver: format!("{:?}", driver.kind()).to_lowercase(),
        snapshot: crate::lab::retrying("reading the lab's state", retry_for, || driver.snapshot())?,
        workers: driver.workers()?,
        // A view without the record counts beats no view.
        records: driver.audit(None).ok().flatten().map(|a| Records {
            produced: a.produced,
            processed: a.processed,
            duplicated: a.duplicates,
            unprocessed: a.lost.len(),
            overlaps: a.overlaps.len(),
        }),
    })
}

/// The plain-text rendering (`monitor --once`, `status`).
pub fn text(view: &View) -> String {
    let s = &view.snapshot;
    let mut out = String::new();
    out.push_str(&format!(
        "driver {}   stream: {} open shards\n",
        view.driver, s.open_shards
    ));
    // The limit, its inputs, any deficit and the coordinator, as the worker renders them.
    out.push_str(&s.limits().to_string());
    if let Some(r) = &view.records {
        out.push_str(&format!(
            "records: {} produced, {} processed, {} duplicated, {} not yet processed, {} overlapping reads\n",
            r.produced, r.processed, r.duplicated, r.unprocessed, r.overlaps
        ));
    }
    let limit = s
        .lease_limits
        .as_ref()
        .map_or(0, |l| l.max_leases_per_worker);
    out.push_str("workers:\n");
    for w in &view.workers {
        let held = s.leases.by_owner.get(&w.name).copied().unwrap_or(0);
        out.push_str(&format!(
            "  {:<18} {:<8} {:<9} {:>4}/{:<4} {}\n",
            w.name,
            w.phase,
            if w.ready { "ready" } else { "not ready" },
            held,
            limit,
            bar(held, limit, 20)
        ));
    }
    out.push_str(&format!(
        "coverage: {}/{} readable shards leased, {} unowned, {} parents finished\n",
        s.leases.leased(),
        s.leases.readable,
        s.leases.unowned_readable,
        s.leases.finished
    ));
    out
}

fn bar(held: u64, limit: u64, width: usize) -> String {
    let filled = (held.min(limit) * width as u64)
        .checked_div(limit)
        .unwrap_or(0) as usize;
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// Runs the dashboard until `q` or Esc.
pub fn live(driver: &dyn Driver, interval: Duration) -> anyhow::Result<()> {
    let mut terminal = ratatui::init();
    let mut changes: Vec<String> = Vec::new();
    let mut last_version: Option<(u64, u64)> = None;
    let result = (|| -> anyhow::Result<()> {
        loop {
            let view = gather(driver, Duration::ZERO);
            if let Ok(v) = &view
                && let Some(l) = &v.snapshot.lease_limits
                && last_version != Some((l.epoch, l.version))
            {
                last_version = Some((l.epoch, l.version));
                changes.push(format!(
                    "{} v{} limit {} (shards {}, workers {}, deficit {}) by {}",
                    l.updated_at,
                    l.version,
                    l.max_leases_per_worker,
                    l.shard_count,
                    l.worker_count,
                    l.capacity_deficit,
                    l.computed_by
                ));
                if changes.len() > 8 {
                    changes.remove(0);
                }
            }
            terminal.draw(|f| {
                let area = f.area();
                let workers = view.as_ref().map_or(0, |v| v.workers.len()) as u16;
                let rows = Layout::vertical([
                    Constraint::Length(8),
                    Constraint::Length(workers + 2),
                    Constraint::Min(4),
                ])
                .split(area);
                // Everything above the worker list: formula, inputs, deficit, coordinator.
                let header = match &view {
                    Ok(v) => text(v)
                        .lines()
                        .take_while(|l| *l != "workers:")
                        .map(|l| {
                            let line = Line::from(l.to_owned());
                            if l.contains("CAPACITY DEFICIT") {
                                line.fg(Color::Yellow)
                            } else {
                                line
                            }
                        })
                        .collect::<Vec<_>>(),
                    Err(e) => {
                        vec![Line::from(format!("cannot read the lab: {e:#}")).fg(Color::Red)]
                    }
                };
                f.render_widget(
                    Paragraph::new(header).block(Block::default().borders(Borders::ALL).title(
                        format!(" KDS Lease Lab — every {}s, q to quit ", interval.as_secs()),
                    )),
                    rows[0],
                );
                if let Ok(v) = &view {
                    let limit = v
                        .snapshot
                        .lease_limits
                        .as_ref()
                        .map_or(0, |l| l.max_leases_per_worker);
                    let block = Block::default()
                        .borders(Borders::ALL)
                        .title(" workers: leases held / limit ");
                    let inner = block.inner(rows[1]);
                    f.render_widget(block, rows[1]);
                    let lines =
                        Layout::vertical(vec![Constraint::Length(1); v.workers.len()]).split(inner);
                    for (w, line) in v.workers.iter().zip(lines.iter()) {
                        let held = v
                            .snapshot
                            .leases
                            .by_owner
                            .get(&w.name)
                            .copied()
                            .unwrap_or(0);
                        let ratio = if limit == 0 {
                            0.0
                        } else {
                            (held as f64 / limit as f64).min(1.0)
                        };
                        let color = if !w.ready {
                            Color::Red
                        } else if held > limit {
                            Color::Yellow
                        } else {
                            Color::Green
                        };
                        f.render_widget(
                            Gauge::default()
                                .gauge_style(Style::default().fg(color))
                                .ratio(ratio)
                                .label(format!("{} {} {}/{}", w.name, w.phase, held, limit)),
                            *line,
                        );
                    }
                }
                let mut tail: Vec<Line> = match &view {
                    Ok(v) => text(v)
                        .lines()
                        .rev()
                        .take(1)
                        .map(|l| Line::from(l.to_owned()))
                        .collect(),
                    Err(_) => vec![],
                };
                tail.push(Line::from("recent lease_limits changes:").bold());
                tail.extend(changes.iter().rev().map(|c| Line::from(c.clone())));
                f.render_widget(
                    Paragraph::new(tail).block(Block::default().borders(Borders::ALL)),
                    rows[2],
                );
            })?;
            let until = Instant::now() + interval;
            while Instant::now() < until {
                if event::poll(Duration::from_millis(200))?
                    && let Event::Key(k) = event::read()?
                    && matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                {
                    return Ok(());
                }
            }
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use kds_model::{CoordinatorRow, LeaseSummary, PublishedLimit};

    #[test]
    fn text_view_shows_formula_coordinator_workers_and_deficit() {
        let view = View {
            driver: "local".into(),
            snapshot: Snapshot {
                stream: "kds-lab".into(),
                open_shards: 300,
                lease_limits_problem: None,
                lease_limits: Some(PublishedLimit {
                    max_leases_per_worker: 80,
                    shard_count: 300,
                    worker_count: 3,
                    desired_workers: None,
                    live_workers: 3,
                    cap: 80,
                    capacity_deficit: 60,
                    workers_needed: 4,
                    epoch: 2,
                    version: 7,
                    computed_by: "kds-consumer-1".into(),
                    updated_at: "t".into(),
                }),
                coordinator: Some(CoordinatorRow {
                    owner: "kds-consumer-1".into(),
                    epoch: 2,
                    counter: 10,
                    renewed_at: "t".into(),
                    failover_ms: None,
                    heartbeat_ms: None,
                    limit_stamp: None,
                    lease_stamp: None,
                    owner_heartbeat: None,
                    verdict_due_in_ms: None,
                }),
                heartbeats: vec![],
                leases: LeaseSummary {
                    readable: 300,
                    unowned_readable: 60,
                    by_owner: [("kds-consumer-0".to_owned(), 80)].into(),
                    ..Default::default()
                },
            },
            workers: vec![WorkerView {
                name: "kds-consumer-0".into(),
                phase: "Running".into(),
                ready: true,
            }],
            records: Some(Records {
                produced: 120,
                processed: 118,
                duplicated: 0,
                unprocessed: 2,
                overlaps: 0,
            }),
        };
        let t = text(&view);
        assert!(
            t.contains("max_leases_per_worker = 80 = min(cap 80, ceil(300 shards / 3 workers))"),
            "{t}"
        );
        assert!(t.contains("CAPACITY DEFICIT: 60 shards"), "{t}");
        assert!(t.contains("4 workers would cover them"), "{t}");
        assert!(t.contains("coordinator kds-consumer-1 (epoch 2"), "{t}");
        assert!(
            t.contains("records: 120 produced, 118 processed, 0 duplicated, 2 not yet processed"),
            "{t}"
        );
        assert!(
            t.contains("kds-consumer-0")
                && t.contains("80/80")
                && t.contains("[####################]"),
            "{t}"
        );
    }
}
