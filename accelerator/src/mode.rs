//! Which directions of the app <-> sidecar hops meshlane redirects, chosen per kernel from what
//! the probe measured (docs/DESIGN.md invariant 7, "the reader rule").
//!
//! A socket in a sockhash reads through the kernel's `tcp_bpf` code. Bytes redirected *into* an
//! app's socket change what the app observes (splice, MSG_WAITALL, SO_RCVLOWAT, ...), and on some
//! kernels even an app socket that only *sends* through meshlane answers FIONREAD differently.
//! So the operator names a wish (`--mode`), the probe measures each mode's app-visible
//! behaviour on the running kernel, and [`decide`] turns the two into the mode the daemon uses,
//! with the reason, for status, metrics and logs.

use serde::Serialize;

use crate::probe;

/// What the daemon redirects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The reader rule: only app -> sidecar, on both hops. The app's socket never receives a
    /// redirected byte and leaves the sockhash at its own half-close.
    Reader,
    /// Opt-in: both directions of both hops, also into the app's socket. Apps can tell (the
    /// probe lists how on this kernel).
    TwoWay,
    /// App sockets are left alone; only the sidecar <-> sidecar hop between pods on this node is
    /// redirected (both directions: both ends are sidecars, no app socket is involved). What
    /// `auto` gives where apps could tell the reader rule from plain TCP.
    Sidecar,
    /// Nothing: app sockets are left alone and nothing is attached.
    Off,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Reader => "reader",
            Mode::TwoWay => "two-way",
            Mode::Sidecar => "sidecar",
            Mode::Off => "off",
        }
    }

    pub const ALL: [Mode; 4] = [Mode::Reader, Mode::TwoWay, Mode::Sidecar, Mode::Off];

    /// Whether the app <-> sidecar hops are paired in this mode.
    pub fn app_hops(self) -> bool {
        matches!(self, Mode::Reader | Mode::TwoWay)
    }

    /// The choice that asks for this mode (a pod's own mode is judged like `--mode`).
    pub fn choice(self) -> Choice {
        match self {
            Mode::Reader => Choice::Reader,
            Mode::TwoWay => Choice::TwoWay,
            Mode::Sidecar => Choice::Sidecar,
            Mode::Off => Choice::Off,
        }
    }

    /// The names of `--mode`, the pod list's `mode` and the `meshlane.io/mode` annotation.
    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.as_str() == s.trim())
    }
}

/// What the operator asked for with `--mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// The reader rule if the probe found apps see exactly plain TCP under it on this kernel;
    /// otherwise app sockets are left alone and only the sidecar hop is redirected (status
    /// names the behaviour that decided it).
    Auto,
    /// The reader rule (only app -> sidecar, so the app's socket never receives a redirected
    /// byte) even where the probe found app-visible differences (they are listed).
    Reader,
    /// Also sidecar -> app, into the app's socket (apps can tell: splice, MSG_WAITALL,
    /// SO_RCVLOWAT, ...); refused where the probe finds it unsafe.
    TwoWay,
    /// Only the sidecar <-> sidecar hop (needs --sidecar-hop on); app sockets are left alone.
    Sidecar,
    /// Accelerate nothing.
    Off,
}

/// The mode in force and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub mode: Mode,
    /// One sentence for status and logs.
    pub why: String,
    /// App-visible behaviours that differ from plain TCP in the chosen mode (accepted by an
    /// explicit opt-in), or that decided against a mode.
    pub differences: Vec<String>,
}

/// Combines the operator's `choice` with the probe's measurements. Without a report (`--force`
/// skipped the probe) the choice is taken at its word and `auto` means the reader rule.
/// `sidecar_hop` is the operator's `--sidecar-hop`: without it the sidecar mode has nothing to
/// redirect, so it is off.
pub fn decide(choice: Choice, report: Option<&probe::Report>, sidecar_hop: bool) -> Decision {
    let Some(report) = report else {
        let mode = match choice {
            Choice::Auto | Choice::Reader => Mode::Reader,
            Choice::TwoWay => Mode::TwoWay,
            Choice::Sidecar if sidecar_hop => Mode::Sidecar,
            Choice::Sidecar | Choice::Off => Mode::Off,
        };
        return Decision {
            mode,
            why: format!(
                "--mode {} with the probe skipped (--force): not measured on this kernel",
                mode.as_str()
            ),
            differences: Vec::new(),
        };
    };
    if choice == Choice::Off {
        return Decision {
            mode: Mode::Off,
            why: "--mode off".into(),
            differences: Vec::new(),
        };
    }
    if !report.ok {
        return Decision {
            mode: Mode::Off,
            why: format!("the safety probe failed: {}", report.reasons()),
            differences: Vec::new(),
        };
    }
    let reader = report.mode(Mode::Reader);
    match choice {
        Choice::Auto => {
            let left_alone = match reader {
                Some(r) if r.safe && r.differences.is_empty() => {
                    return Decision {
                        mode: Mode::Reader,
                        why: "the reader rule: app sockets behaved exactly as on plain TCP in every probed behaviour".into(),
                        differences: Vec::new(),
                    }
                }
                Some(r) if r.safe => Decision {
                    mode: Mode::Off,
                    why: format!(
                        "app sockets left alone: under the reader rule an app would notice on this kernel ({}); --mode reader accepts that",
                        r.difference_names().join(", ")
                    ),
                    differences: r.describe(),
                },
                Some(r) => Decision {
                    mode: Mode::Off,
                    why: format!("app sockets left alone: the reader rule is unsafe here ({})", r.problem),
                    differences: r.describe(),
                },
                None => Decision {
                    mode: Mode::Off,
                    why: "app sockets left alone: the probe could not measure the reader rule".into(),
                    differences: Vec::new(),
                },
            };
            // No app socket is on the sidecar <-> sidecar hop, so what apps could notice does
            // not apply to it: it is redirected wherever the probe saw it work.
            match sidecar_mode(report, sidecar_hop) {
                Ok(()) => Decision {
                    mode: Mode::Sidecar,
                    why: format!(
                        "{}; the sidecar <-> sidecar hop is redirected",
                        left_alone.why
                    ),
                    ..left_alone
                },
                Err(why) => Decision {
                    why: format!("{}; {why}", left_alone.why),
                    ..left_alone
                },
            }
        }
        Choice::Sidecar => match sidecar_mode(report, sidecar_hop) {
            Ok(()) => Decision {
                mode: Mode::Sidecar,
                why: "--mode sidecar: only the sidecar <-> sidecar hop, app sockets left alone"
                    .into(),
                differences: Vec::new(),
            },
            Err(why) => Decision {
                mode: Mode::Off,
                why: format!("--mode sidecar refused: {why}"),
                differences: Vec::new(),
            },
        },
        Choice::Reader | Choice::TwoWay => {
            let mode = if choice == Choice::Reader {
                Mode::Reader
            } else {
                Mode::TwoWay
            };
            match report.mode(mode) {
                Some(m) if m.safe => Decision {
                    mode,
                    why: if m.differences.is_empty() {
                        format!(
                            "--mode {}: identical to plain TCP for apps here",
                            mode.as_str()
                        )
                    } else {
                        format!(
                            "--mode {} (opt-in): apps can notice {}",
                            mode.as_str(),
                            m.difference_names().join(", ")
                        )
                    },
                    differences: m.describe(),
                },
                Some(m) => Decision {
                    mode: Mode::Off,
                    why: format!(
                        "--mode {} refused: unsafe on this kernel ({})",
                        mode.as_str(),
                        m.problem
                    ),
                    differences: m.describe(),
                },
                None => Decision {
                    mode: Mode::Off,
                    why: format!(
                        "--mode {} refused: the probe could not measure it",
                        mode.as_str()
                    ),
                    differences: Vec::new(),
                },
            }
        }
        Choice::Off => unreachable_off(),
    }
}

/// Whether the sidecar mode can redirect anything here, and if not why.
fn sidecar_mode(report: &probe::Report, sidecar_hop: bool) -> Result<(), &'static str> {
    if !sidecar_hop {
        Err("the sidecar hop is off (--sidecar-hop off)")
    } else if !report.passed(probe::SIDECAR_HOP_CHECK) {
        Err("the probe's sidecar hop check did not pass")
    } else {
        Ok(())
    }
}

/// `Choice::Off` returns before the match; kept as a value instead of a panic (the daemon never
/// panics on its input).
fn unreachable_off() -> Decision {
    Decision {
        mode: Mode::Off,
        why: "--mode off".into(),
        differences: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{Check, Difference, ModeReport, Report, Status, SIDECAR_HOP_CHECK};

    fn report(reader_diffs: &[&'static str], two_way_safe: bool) -> Report {
        let diff = |b: &'static str| Difference {
            behaviour: b,
            hop: "inbound",
            plain: "a".into(),
            meshlane: "b".into(),
        };
        Report {
            kernel: "test".into(),
            ok: true,
            checks: vec![Check {
                name: SIDECAR_HOP_CHECK,
                status: Status::Pass,
                detail: String::new(),
                ms: 0,
            }],
            modes: vec![
                ModeReport {
                    mode: Mode::Reader,
                    safe: true,
                    problem: String::new(),
                    differences: reader_diffs.iter().map(|b| diff(b)).collect(),
                },
                ModeReport {
                    mode: Mode::TwoWay,
                    safe: two_way_safe,
                    problem: if two_way_safe {
                        String::new()
                    } else {
                        "FIONREAD misses redirected bytes".into()
                    },
                    differences: vec![diff("splice_to_pipe")],
                },
            ],
        }
    }

    #[test]
    fn auto_takes_the_reader_rule_only_where_apps_cannot_tell() {
        let d = decide(Choice::Auto, Some(&report(&[], true)), true);
        assert_eq!(d.mode, Mode::Reader);
        assert!(d.differences.is_empty());
        let visible = report(&["fionread_tcp", "oob_send"], true);
        let d = decide(Choice::Auto, Some(&visible), true);
        assert_eq!(d.mode, Mode::Sidecar);
        assert!(!d.mode.app_hops());
        assert!(
            d.why.contains("fionread_tcp") && d.why.contains("oob_send"),
            "{}",
            d.why
        );
        assert!(d.why.contains("sidecar <-> sidecar"), "{}", d.why);
        assert_eq!(d.differences.len(), 2);
    }

    #[test]
    fn auto_falls_back_to_off_when_the_sidecar_hop_cannot_run() {
        let visible = report(&["oob_send"], true);
        let d = decide(Choice::Auto, Some(&visible), false);
        assert_eq!(d.mode, Mode::Off);
        assert!(d.why.contains("--sidecar-hop off"), "{}", d.why);
        assert!(d.why.contains("oob_send"), "{}", d.why);
        let mut failed = visible.clone();
        failed.checks[0].status = Status::Fail;
        let d = decide(Choice::Auto, Some(&failed), true);
        assert_eq!(d.mode, Mode::Off);
        assert!(d.why.contains("sidecar hop check"), "{}", d.why);
        // An explicit --mode sidecar is judged the same way.
        assert_eq!(decide(Choice::Sidecar, Some(&failed), true).mode, Mode::Off);
        assert_eq!(
            decide(Choice::Sidecar, Some(&visible), false).mode,
            Mode::Off
        );
        let d = decide(Choice::Sidecar, Some(&report(&[], true)), true);
        assert_eq!(d.mode, Mode::Sidecar);
        assert!(d.differences.is_empty(), "no app socket is touched");
    }

    #[test]
    fn an_opt_in_accepts_differences_but_not_an_unsafe_mode() {
        let r = report(&["fionread_tcp"], false);
        let d = decide(Choice::Reader, Some(&r), true);
        assert_eq!(d.mode, Mode::Reader);
        assert!(d.why.contains("fionread_tcp"), "{}", d.why);
        let d = decide(Choice::TwoWay, Some(&r), true);
        assert_eq!(d.mode, Mode::Off);
        assert!(d.why.contains("two-way refused"), "{}", d.why);
        assert!(d.why.contains("FIONREAD"), "{}", d.why);
        assert_eq!(
            decide(Choice::TwoWay, Some(&report(&[], true)), true).mode,
            Mode::TwoWay
        );
    }

    #[test]
    fn a_failed_probe_or_off_accelerates_nothing_and_force_takes_the_word() {
        let mut r = report(&[], true);
        r.ok = false;
        assert_eq!(decide(Choice::Reader, Some(&r), true).mode, Mode::Off);
        assert_eq!(decide(Choice::Auto, Some(&r), true).mode, Mode::Off);
        assert_eq!(
            decide(Choice::Off, Some(&report(&[], true)), true).mode,
            Mode::Off
        );
        assert_eq!(decide(Choice::Auto, None, true).mode, Mode::Reader);
        assert_eq!(decide(Choice::TwoWay, None, true).mode, Mode::TwoWay);
        assert_eq!(decide(Choice::Sidecar, None, true).mode, Mode::Sidecar);
        assert_eq!(decide(Choice::Sidecar, None, false).mode, Mode::Off);
        assert_eq!(Mode::parse(" two-way "), Some(Mode::TwoWay));
        assert_eq!(Mode::parse("sidecar"), Some(Mode::Sidecar));
        for m in Mode::ALL {
            assert_eq!(decide(m.choice(), None, true).mode, m, "{m:?}");
        }
        assert_eq!(Mode::parse("fast"), None);
    }
}
