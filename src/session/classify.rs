//! How a connection ended, classified (brief §3.2): which error class, which IM code, and a
//! message a human can act on. Pure: it sees the ended connection and what the machine knows
//! about the sig in use ([`Context`]), and decides nothing else.

use super::{ConnEnd, ErrorClass, KickReason, LastError, MAX_REASON_CHARS, codes, quote_external};

/// What a classified failure says to do.
pub(super) struct Classified {
    pub class: ErrorClass,
    pub err: LastError,
    /// For `Kicked`: which kind.
    pub kick: Option<KickReason>,
    /// For `SigExpired`: the server called a sig expired that our clock says is still good
    /// (spends the budget); otherwise the sig simply reached its end.
    pub premature: bool,
}

/// What the machine knows when a connection ends.
pub(super) struct Context {
    /// The connection had reached CONNACK.
    pub online: bool,
    /// The sig is at or past its deadline on our clock.
    pub expired_here: bool,
    /// The sig is near its end: the server's clock may run a little ahead of ours. Unknown
    /// (an opaque sig): not near, so the budget bounds it.
    pub near_end: bool,
}

/// Classify an ended connection (brief §3.2).
pub(super) fn classify(end: &ConnEnd, at: &Context) -> Classified {
    use ErrorClass::*;
    let c = |class: ErrorClass, code: u32, msg: String| Classified {
        class,
        err: LastError::new(code, class, msg),
        kick: None,
        premature: false,
    };
    let said = |reason: &Option<String>| {
        reason
            .as_deref()
            .map(|r| format!(": {}", quote_external(r, MAX_REASON_CHARS)))
            .unwrap_or_default()
    };
    // The broker's own word, typed (the `im-error-code` user property): never parsed back out
    // of a reason string, which is only quoted in the message.
    let says_expired = |im_code: &Option<u32>| *im_code == Some(codes::SVR_SIG_EXPIRED);
    let expired_here = at.expired_here;
    let near_end = at.near_end;
    match end {
        ConnEnd::Network { kind, detail } => {
            let what = if at.online {
                "connection lost"
            } else {
                "could not connect"
            };
            c(Network, kind.code(), format!("{what}: {detail}"))
        }
        ConnEnd::Redirect {
            code,
            reference,
            reason,
            ..
        } => c(
            Busy,
            codes::NET_DISCONNECT,
            format!(
                "the broker sent us to another server (0x{code:02X}, {}{})",
                quote_external(reference, 80),
                said(reason)
            ),
        ),
        ConnEnd::CertNotYetValid { detail } => c(
            Clock,
            0,
            format!(
                "TLS says the server certificate is not valid yet ({detail}): the device \
                 clock is probably behind; waiting for time sync"
            ),
        ),
        ConnEnd::Refused {
            code,
            reason,
            im_code,
        } => {
            let r = said(reason);
            match *code {
                0x87 | 0x86 if expired_here => c(
                    SigExpired,
                    codes::SVR_SIG_EXPIRED,
                    format!(
                        "the IM service refused the UserSig (CONNACK 0x{code:02X}{r}) and it \
                         is past its expiry"
                    ),
                ),
                0x87 | 0x86 if says_expired(im_code) => Classified {
                    premature: true,
                    ..c(
                        SigExpired,
                        codes::SVR_SIG_EXPIRED,
                        format!(
                            "the IM service says the UserSig expired (CONNACK 0x{code:02X}{r})"
                        ),
                    )
                },
                0x87 | 0x86 => c(
                    SigRejected,
                    sig_code(im_code).unwrap_or(codes::SVR_SIG_CHECK_FAILED),
                    format!(
                        "the IM service refused the UserSig (CONNACK 0x{code:02X} {}{r})",
                        if *code == 0x87 {
                            "Not authorized"
                        } else {
                            "Bad user name or password"
                        }
                    ),
                ),
                0x8A => c(
                    Fatal,
                    codes::SVR_BANNED,
                    format!(
                        "the IM service says this account is banned (CONNACK 0x8A{r}); ask \
                         the app's administrator, then run `imlinkctl login`"
                    ),
                ),
                0x85 => c(
                    Fatal,
                    codes::INVALID_PARAMETERS,
                    format!(
                        "the IM service refused the MQTT client id (CONNACK 0x85{r}); check \
                         broker.client_id in the config"
                    ),
                ),
                0x84 | 0x8C => c(
                    Fatal,
                    codes::INVALID_PARAMETERS,
                    format!("the IM service does not accept this client (CONNACK 0x{code:02X}{r})"),
                ),
                0x9F => c(
                    Busy,
                    codes::SVR_FREQ_LIMIT,
                    format!(
                        "the IM service limits the login rate (CONNACK 0x9F{r}); retrying later"
                    ),
                ),
                0x81 | 0x82 | 0x90 | 0x95 | 0x99 | 0x9A | 0x9B => c(
                    Protocol,
                    codes::NET_DISCONNECT,
                    format!(
                        "the IM service refused the CONNECT as invalid (CONNACK 0x{code:02X}{r})"
                    ),
                ),
                _ => c(
                    Busy,
                    codes::NET_DISCONNECT,
                    format!(
                        "the IM service refused the connection for now (CONNACK 0x{code:02X}{r})"
                    ),
                ),
            }
        }
        ConnEnd::ServerDisconnect {
            code,
            reason,
            im_code,
        } => {
            let r = said(reason);
            match *code {
                0x8E => Classified {
                    kick: Some(KickReason::LoggedInElsewhere),
                    ..c(
                        Kicked,
                        codes::KICKED_OFF_BY_OTHER,
                        format!(
                            "logged in elsewhere: another login took the session (DISCONNECT 0x8E{r})"
                        ),
                    )
                },
                0x98 => Classified {
                    kick: Some(KickReason::KickedByAdmin),
                    ..c(
                        Kicked,
                        codes::KICKED_OFF_BY_OTHER,
                        format!("kicked offline by an administrator (DISCONNECT 0x98{r})"),
                    )
                },
                0xA0 if im_code.is_none() || says_expired(im_code) || near_end => Classified {
                    premature: !near_end,
                    ..c(
                        SigExpired,
                        codes::SVR_SIG_EXPIRED,
                        format!("the UserSig expired while online (DISCONNECT 0xA0{r})"),
                    )
                },
                // Only our own clock decides: a session the server just accepted and then
                // ends as "not authorized" is a rejection (an ACL, a revoked account),
                // whatever its reason string says.
                0x87 | 0x86 if expired_here => c(
                    SigExpired,
                    codes::SVR_SIG_EXPIRED,
                    format!(
                        "the IM service ended the session as the UserSig ran out (DISCONNECT 0x{code:02X}{r})"
                    ),
                ),
                0x87 | 0x86 => c(
                    SigRejected,
                    sig_code(im_code).unwrap_or(codes::SVR_SIG_CHECK_FAILED),
                    format!("the IM service revoked the UserSig (DISCONNECT 0x{code:02X}{r})"),
                ),
                0x89 | 0x8B | 0x96 | 0x97 => c(
                    Busy,
                    codes::NET_DISCONNECT,
                    format!("the server is busy or shutting down (DISCONNECT 0x{code:02X}{r})"),
                ),
                0x81 | 0x82 | 0x8C | 0x8F | 0x90 | 0x93 | 0x94 | 0x95 | 0x99 | 0x9A | 0x9B
                | 0x9E | 0xA1 | 0xA2 => c(
                    Protocol,
                    codes::NET_DISCONNECT,
                    format!(
                        "the server ended the session for a reason a reconnect does not fix \
                         (DISCONNECT 0x{code:02X}{r})"
                    ),
                ),
                _ => c(
                    Network,
                    codes::NET_DISCONNECT,
                    format!("the server ended the session (DISCONNECT 0x{code:02X}{r})"),
                ),
            }
        }
    }
}

/// The broker's IM code when it is one of the UserSig codes (70xxx: 70009 signature mismatch,
/// 70013 another UserID, …), to report instead of the generic 70003.
fn sig_code(im_code: &Option<u32>) -> Option<u32> {
    im_code.filter(|c| (70000..80000).contains(c))
}
