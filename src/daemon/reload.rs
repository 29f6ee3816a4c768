//! Reloading the config: what to do is planned by a pure function ([`plan`]) from
//! the running config, the new one and the running banks; [`Switch::reload`]
//! carries the plan out.

use super::Switch;
use crate::config::{Bank, Config};
use crate::core::inflight::STAN_MAX;
use crate::core::route::BankIndex;
use crate::net::connector::{Bookkeeping, Connector};
use crate::net::live::{Live, CONNECTOR_SLOTS_MAX};
use crate::tls::TlsSetup;
use std::sync::Arc;
use std::time::Duration;

/// How long a reload waits for a bank it adds (or replaces) to have a link up
/// before putting the new config in force anyway.
pub const RELOAD_LINK_WAIT: Duration = Duration::from_secs(5);

/// STANs left between a replaced connector's position and its successor's start.
pub const REPLACED_STAN_GAP: u32 = 1000;

/// A bank of the running config, as the planner sees it.
#[derive(Clone, Copy, Debug)]
pub struct Running<'a> {
    /// Its config, as its connector was made with.
    pub bank: &'a Bank,
    /// Its connector slot.
    pub slot: BankIndex,
    /// Links it runs now.
    pub links: usize,
    /// Its STAN counter's position.
    pub stan_position: u32,
}

/// What a reload does with one bank of the new config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Its connector stays; new `links`, deadline and `optional` are applied.
    Keep {
        /// The connector's slot.
        slot: BankIndex,
        /// Links running → links wanted, when they differ.
        resize: Option<(usize, usize)>,
    },
    /// Its link settings changed: a new connector takes over from the one in
    /// `slot`, its STANs starting at `first_stan` (past what the old one may still
    /// use while it retires).
    Replace {
        /// The running connector's slot.
        slot: BankIndex,
        /// The new connector's first STAN.
        first_stan: u32,
    },
    /// A bank the running config does not have.
    Add {
        /// The new connector's first STAN.
        first_stan: u32,
    },
}

/// What a reload does: a step per bank of the new config (in its order), and the
/// running banks it retires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// One per bank of the new config.
    pub steps: Vec<Step>,
    /// Slots of running banks the new config does not name.
    pub removed: Vec<BankIndex>,
}

/// Why a config cannot be reloaded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// It changes what only a restart can (config keys).
    #[error("{} changed: this needs a restart", .0.join(", "))]
    RestartOnly(Vec<&'static str>),
    /// It adds or replaces more banks than the process has connector slots left.
    #[error(
        "{0} banks added or replaced would pass the {CONNECTOR_SLOTS_MAX} connector slots \
         this process keeps: restart to renumber"
    )]
    SlotsExhausted(usize),
}

/// Plans the reload of `old` (whose banks run as `running`, using `slots_used`
/// connector slots) to `new`; added banks' STANs start at `next_stan`.
pub fn plan(
    old: &Config,
    new: &Config,
    running: &[Running<'_>],
    slots_used: usize,
    next_stan: u32,
) -> Result<Plan, PlanError> {
    let fixed = old.restart_only_changes(new);
    if !fixed.is_empty() {
        return Err(PlanError::RestartOnly(fixed));
    }
    let steps: Vec<Step> = new
        .banks
        .iter()
        .map(|bank| match running.iter().find(|r| r.bank.id == bank.id) {
            Some(r) if r.bank.same_link_settings(bank) => Step::Keep {
                slot: r.slot,
                resize: (r.links != bank.links).then_some((r.links, bank.links)),
            },
            Some(r) => Step::Replace {
                slot: r.slot,
                first_stan: (r.stan_position + REPLACED_STAN_GAP) % STAN_MAX + 1,
            },
            None => Step::Add {
                first_stan: next_stan,
            },
        })
        .collect();
    let fresh = steps
        .iter()
        .filter(|s| !matches!(s, Step::Keep { .. }))
        .count();
    if slots_used + fresh > CONNECTOR_SLOTS_MAX {
        return Err(PlanError::SlotsExhausted(fresh));
    }
    let removed = running
        .iter()
        .filter(|r| !new.banks.iter().any(|b| b.id == r.bank.id))
        .map(|r| r.slot)
        .collect();
    Ok(Plan { steps, removed })
}

impl Plan {
    /// One line saying what the reload did.
    pub fn summary(&self, new: &Config, unlinked: &[String]) -> String {
        let mut what = format!(
            "config reloaded: {} PAN prefixes, {} institutions, {} banks",
            new.routes.prefix_count(),
            new.institutions.len(),
            new.banks.len()
        );
        let count = |f: fn(&Step) -> bool| self.steps.iter().filter(|s| f(s)).count();
        let added = count(|s| matches!(s, Step::Add { .. }));
        let replaced = count(|s| matches!(s, Step::Replace { .. }));
        let removed = self.removed.len();
        if added + replaced + removed > 0 {
            what.push_str(&format!(
                " ({added} added, {replaced} replaced, {removed} removed)"
            ));
        }
        let resized: Vec<String> = new
            .banks
            .iter()
            .zip(&self.steps)
            .filter_map(|(bank, step)| match step {
                Step::Keep {
                    resize: Some((from, to)),
                    ..
                } => Some(format!("{} {from}→{to}", bank.id)),
                _ => None,
            })
            .collect();
        if !resized.is_empty() {
            what.push_str(&format!("; links resized: {}", resized.join(", ")));
        }
        if !unlinked.is_empty() {
            what.push_str(&format!(
                "; no link up yet to {} (requests to it fail over or get 91 until one is)",
                unlinked.join(", ")
            ));
        }
        what
    }
}

impl Switch {
    /// Reloads the config file at `path` (SIGHUP, `switchyard reload`). The whole
    /// file is validated as `check-config` does, and the TLS files it names are
    /// read again; an invalid file, or one changing what only a restart can (see
    /// [`Config::restart_only_changes`]), is rejected whole and the running config
    /// stays. Otherwise everything else is put in force without closing a
    /// connection or dropping a request in flight: routes, failover lists,
    /// institutions and their certificate names and rate limits, limits, request
    /// deadlines, TLS certificates and revocation lists (for new handshakes), and
    /// the banks: added ones are connected (waiting up to [`RELOAD_LINK_WAIT`] for
    /// a first link), removed ones retired (their links finish what they carry,
    /// sign off and close), and resized ones start or retire links. A bank whose
    /// link settings changed gets a new connector, which takes over once linked.
    pub async fn reload(&self, path: &std::path::Path) -> Result<String, String> {
        let _one_at_a_time = self.reloading.lock().await;
        let result = self.try_reload(path).await;
        let label = if result.is_ok() {
            "applied"
        } else {
            "rejected"
        };
        metrics::counter!("switchyard_config_reloads_total", "result" => label).increment(1);
        result
    }

    async fn try_reload(&self, path: &std::path::Path) -> Result<String, String> {
        let new = Config::load(path).map_err(|e| e.to_string())?;
        let old = self.ingress.live();
        let running: Vec<Running<'_>> = old
            .active_connectors()
            .map(|c| Running {
                bank: c.bank(),
                slot: c.index(),
                links: c.links_configured(),
                stan_position: c.stan_position(),
            })
            .collect();
        let next_stan = (self.ingress.next_request_id() % u64::from(STAN_MAX)) as u32 + 1;
        let plan = plan(&old.config, &new, &running, old.connectors.len(), next_stan)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let tls =
            TlsSetup::from_files(&new.tls_files).map_err(|e| format!("{}: {e}", path.display()))?;
        // Checked as check-config does; only a restart puts them in force.
        if let Some(files) = &new.admin_tls {
            files.load().map_err(|e| e.to_string())?;
        }
        // Retired connectors that have stopped leave a tombstone in their slot.
        let mut slots: Vec<Arc<Connector>> = old
            .connectors
            .iter()
            .map(|c| {
                if c.is_stopped() && !c.is_tombstone() {
                    c.tombstone()
                } else {
                    c.clone()
                }
            })
            .collect();
        // New connectors first; they take over once linked (or after the wait).
        let mut active = Vec::with_capacity(new.banks.len());
        let mut fresh = Vec::new();
        let mut replaced = Vec::new();
        for (bank, step) in new.banks.iter().zip(&plan.steps) {
            let first_stan = match *step {
                Step::Keep { slot, .. } => {
                    if let Some(c) = old.connector(slot) {
                        c.set_tls(tls.client.clone());
                    }
                    active.push(slot);
                    continue;
                }
                Step::Replace { first_stan, .. } | Step::Add { first_stan } => first_stan,
            };
            let index = slots.len() as BankIndex;
            let c = Connector::new(
                index,
                bank.clone(),
                new.dialect.clone(),
                tls.client.clone(),
                new.frame_size_max_bytes,
                self.link_changed.clone(),
                Bookkeeping {
                    first_stan,
                    ..self.books.clone()
                },
            );
            c.spawn_links(&self.shutdown);
            fresh.push(c.clone());
            if let Step::Replace { slot, .. } = *step {
                replaced.push((slot, c.clone()));
            }
            slots.push(c);
            active.push(index);
        }
        let unlinked = self.wait_linked(&fresh, RELOAD_LINK_WAIT).await;
        let new = Arc::new(new);
        let live = Live::new(new.clone(), slots.into(), active, tls.server, Some(&old));
        // In force from here: new connections at once, sessions at their next request.
        self.ingress.replace_live(live);
        for (bank, step) in new.banks.iter().zip(&plan.steps) {
            if let Step::Keep { slot, .. } = *step {
                if let Some(c) = old.connector(slot) {
                    c.apply(bank);
                }
            }
        }
        for &slot in &plan.removed {
            if let Some(c) = old.connector(slot) {
                c.retire();
            }
        }
        for (slot, successor) in replaced {
            if let Some(c) = old.connector(slot) {
                c.retire_into(&successor);
            }
        }
        Ok(plan.summary(&new, &unlinked))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(banks: &[(&str, &str)], extra: &str) -> Config {
        let mut text = String::from(
            "[switch]\nlisten = \"127.0.0.1:0\"\n\
             [tls]\nca_file = \"x\"\ncert_file = \"x\"\nkey_file = \"x\"\n\
             client_cert_file = \"x\"\nclient_key_file = \"x\"\n",
        );
        text.push_str(extra);
        for (id, settings) in banks {
            text.push_str(&format!(
                "\n[[bank]]\nid = \"{id}\"\naddress = \"127.0.0.1:9\"\nserver_name = \"b\"\n{settings}\n"
            ));
        }
        Config::parse(&text, std::path::Path::new("<reload test>")).unwrap()
    }

    fn running(config: &Config) -> Vec<Running<'_>> {
        config
            .banks
            .iter()
            .enumerate()
            .map(|(i, bank)| Running {
                bank,
                slot: i as BankIndex,
                links: bank.links,
                stan_position: 100,
            })
            .collect()
    }

    #[test]
    fn banks_are_kept_resized_replaced_added_and_removed() {
        let old = config(&[("200001", ""), ("200002", ""), ("200003", "")], "");
        let new = config(
            &[
                ("200001", "links = 4"),
                ("200002", "request_timeout_ms = 1000"),
                ("200003", "echo_interval_ms = 1000"),
                ("200004", ""),
            ],
            "",
        );
        let plan = plan(&old, &new, &running(&old), 3, 777).unwrap();
        assert_eq!(
            plan.steps,
            [
                Step::Keep {
                    slot: 0,
                    resize: Some((2, 4))
                },
                Step::Keep {
                    slot: 1,
                    resize: None
                },
                Step::Replace {
                    slot: 2,
                    first_stan: 100 + REPLACED_STAN_GAP + 1
                },
                Step::Add { first_stan: 777 },
            ]
        );
        assert!(plan.removed.is_empty());
        let summary = plan.summary(&new, &["200004".to_owned()]);
        assert!(
            summary.contains("(1 added, 1 replaced, 0 removed)"),
            "{summary}"
        );
        assert!(summary.contains("links resized: 200001 2→4"), "{summary}");
        assert!(summary.contains("no link up yet to 200004"), "{summary}");
        // Removing: the running bank's slot is retired.
        let fewer = config(&[("200002", "")], "");
        let plan = super::plan(&old, &fewer, &running(&old), 3, 1).unwrap();
        assert_eq!(plan.removed, [0, 2]);
        assert_eq!(
            plan.steps,
            [Step::Keep {
                slot: 1,
                resize: None
            }]
        );
    }

    #[test]
    fn restart_only_changes_and_the_slot_bound_refuse_the_plan() {
        let old = config(&[("200001", "")], "");
        let moved = config(&[("200001", "")], "[duplicates]\nwindow_s = 10\n");
        assert_eq!(
            plan(&old, &moved, &running(&old), 1, 1),
            Err(PlanError::RestartOnly(vec!["duplicates"]))
        );
        let more = config(&[("200001", ""), ("200002", "")], "");
        let full = plan(&old, &more, &running(&old), CONNECTOR_SLOTS_MAX, 1);
        assert_eq!(full, Err(PlanError::SlotsExhausted(1)));
        assert!(full
            .unwrap_err()
            .to_string()
            .contains("restart to renumber"));
    }

    #[test]
    fn replaced_stans_wrap_past_the_top() {
        let old = config(&[("200001", "")], "");
        let new = config(&[("200001", "echo_timeout_ms = 1000")], "");
        let mut r = running(&old);
        r[0].stan_position = STAN_MAX - 10;
        let plan = plan(&old, &new, &r, 1, 1).unwrap();
        assert_eq!(
            plan.steps,
            [Step::Replace {
                slot: 0,
                first_stan: (STAN_MAX - 10 + REPLACED_STAN_GAP) % STAN_MAX + 1
            }]
        );
    }
}
