//! What a worker may fetch. A provider's answer is not trusted: the media URLs and poll URLs in
//! it may point anywhere a tenant's prompt talked the model into, including this cluster's own
//! services and the cloud's metadata endpoint. So:
//!
//! - `Policy::check_url` takes only http(s) links without user info, to a host on the
//!   provider's allow-list (`media_hosts`, any host when empty);
//! - [`Policy::client`] builds a reqwest client whose DNS resolver refuses a name if any address
//!   it resolves to is not public (so the connection goes to a checked address, and a name
//!   that resolves to a private address is never reached), whose redirects are each checked
//!   again, and which ignores proxy variables (a proxy would resolve names itself);
//! - [`on_origin`] keeps a provider's `urls.get`/`urls.cancel` on the provider's own origin;
//! - [`read_limited`] and [`read_prefix`] stop reading a body at a cap instead of buffering it
//!   whole first.
//!
//! `allow_private_network` lets loopback, private and shared (CGNAT) addresses through, for a
//! provider that really is on the local network (the simulator in tests); link-local,
//! metadata, multicast and reserved addresses are refused whatever it says.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
pub use reqwest::Url;

/// Redirects a download may follow, each one checked like the first link.
const MAX_REDIRECTS: usize = 3;

/// What an address is, as far as fetching from it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AddrClass {
    Public,
    Loopback,
    /// RFC 1918, unique local (fc00::/7), site-local, local-use NAT64.
    Private,
    /// 100.64.0.0/10, carrier-grade NAT (and Kubernetes on some clouds).
    SharedCgnat,
    LinkLocal,
    /// A cloud instance-metadata endpoint (169.254.169.254, fd00:ec2::254, 100.100.100.200).
    Metadata,
    Unspecified,
    Multicast,
    Broadcast,
    /// Documentation, benchmarking, protocol assignments, future use, Teredo, discard.
    Reserved,
}

impl AddrClass {
    pub fn describe(self) -> &'static str {
        match self {
            AddrClass::Public => "public",
            AddrClass::Loopback => "loopback",
            AddrClass::Private => "private",
            AddrClass::SharedCgnat => "shared (CGNAT)",
            AddrClass::LinkLocal => "link-local",
            AddrClass::Metadata => "cloud metadata",
            AddrClass::Unspecified => "unspecified",
            AddrClass::Multicast => "multicast",
            AddrClass::Broadcast => "broadcast",
            AddrClass::Reserved => "reserved",
        }
    }

    /// The classes `allow_private_network` admits: a network an operator may own.
    fn is_private_network(self) -> bool {
        matches!(
            self,
            AddrClass::Loopback | AddrClass::Private | AddrClass::SharedCgnat
        )
    }
}

fn classify(ip: IpAddr) -> AddrClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddrClass {
    let [a, b, c, d] = ip.octets();
    match (a, b, c, d) {
        (255, 255, 255, 255) => AddrClass::Broadcast,
        (169, 254, 169, 254) | (100, 100, 100, 200) => AddrClass::Metadata,
        (0, ..) => AddrClass::Unspecified,
        (127, ..) => AddrClass::Loopback,
        (10, ..) | (172, 16..=31, ..) | (192, 168, ..) => AddrClass::Private,
        (100, 64..=127, ..) => AddrClass::SharedCgnat,
        (169, 254, ..) => AddrClass::LinkLocal,
        // Protocol assignments (Oracle's metadata is 192.0.0.192), documentation, the old
        // 6to4 relay anycast, benchmarking.
        (192, 0, 0 | 2, _) | (198, 51, 100, _) | (203, 0, 113, _) | (192, 88, 99, _) => {
            AddrClass::Reserved
        }
        (198, 18..=19, ..) => AddrClass::Reserved,
        (224..=239, ..) => AddrClass::Multicast,
        (240..=255, ..) => AddrClass::Reserved,
        _ => AddrClass::Public,
    }
}

fn low_v4(ip: Ipv6Addr) -> Ipv4Addr {
    let o = ip.octets();
    Ipv4Addr::new(o[12], o[13], o[14], o[15])
}

fn classify_v6(ip: Ipv6Addr) -> AddrClass {
    let s = ip.segments();
    if ip.is_unspecified() {
        return AddrClass::Unspecified;
    }
    if ip.is_loopback() {
        return AddrClass::Loopback;
    }
    // Forms that reach an IPv4 address: classify that address. IPv4-mapped (::ffff:a.b.c.d),
    // IPv4-compatible (::a.b.c.d), NAT64 (64:ff9b::a.b.c.d) and 6to4 (2002:aabb:ccdd::).
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    if s[..6] == [0, 0, 0, 0, 0, 0] || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return classify_v4(low_v4(ip));
    }
    if s[0] == 0x2002 {
        let [a, b] = s[1].to_be_bytes();
        let [c, d] = s[2].to_be_bytes();
        return classify_v4(Ipv4Addr::new(a, b, c, d));
    }
    if s == [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254] {
        return AddrClass::Metadata;
    }
    if s[0] & 0xff00 == 0xff00 {
        return AddrClass::Multicast;
    }
    if s[0] & 0xffc0 == 0xfe80 {
        return AddrClass::LinkLocal;
    }
    if s[0] & 0xfe00 == 0xfc00 || s[0] & 0xffc0 == 0xfec0 || (s[0] == 0x64 && s[1] == 0xff9b) {
        return AddrClass::Private;
    }
    // 2001::/23 protocol assignments (Teredo tunnels to a hidden IPv4 address),
    // 2001:db8::/32 and 3fff::/20 documentation, 100::/64 discard.
    if (s[0] == 0x2001 && (s[1] < 0x0200 || s[1] == 0x0db8))
        || (s[0] == 0x3fff && s[1] < 0x1000)
        || s[..4] == [0x0100, 0, 0, 0]
    {
        return AddrClass::Reserved;
    }
    // Global unicast is 2000::/3; the rest is unassigned.
    if s[0] & 0xe000 != 0x2000 {
        return AddrClass::Reserved;
    }
    AddrClass::Public
}

/// Why a link was not fetched. The message names the host, never the whole link (it may
/// carry a signature or a token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("only http and https links are fetched, not {0}:")]
    Scheme(String),
    #[error("links with a user name or password are refused")]
    Userinfo,
    #[error("the link is not a valid URL")]
    Invalid,
    #[error("host {0} is not among this provider's media hosts")]
    NotAllowed(String),
    #[error("{}", describe_address(host, addr, class))]
    Address {
        host: String,
        addr: IpAddr,
        class: &'static str,
    },
    #[error("host {host} did not resolve: {message}")]
    Resolve { host: String, message: String },
    #[error("{0} is not on the provider's origin")]
    OffOrigin(String),
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects,
    #[error("port {0} is not allowed for webhooks")]
    Port(u16),
    #[error("plain http is allowed only to hosts the operator allows; use https")]
    PlainHttp,
}

fn describe_address(host: &str, addr: &IpAddr, class: &str) -> String {
    if host.trim_start_matches('[').trim_end_matches(']') == addr.to_string() {
        format!("{addr} is a {class} address")
    } else {
        format!("host {host} resolves to {addr}, a {class} address")
    }
}

/// One `media_hosts` entry: `host`, `host:port`, or `*.domain` (any subdomain, not the
/// domain itself), with an optional port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostPattern {
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

impl HostPattern {
    fn parse(raw: &str) -> Result<HostPattern, String> {
        let s = raw.trim().to_ascii_lowercase();
        let bad = || format!("media host {raw:?} must be host, host:port or *.domain");
        if s.is_empty() || s.contains(['/', '@', '?', '#']) || s.chars().any(char::is_whitespace) {
            return Err(bad());
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            // [v6] or [v6]:port
            let (h, after) = rest.split_once(']').ok_or_else(bad)?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(bad)?),
            };
            (format!("[{h}]"), port)
        } else {
            match s.split_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (s.clone(), None),
            }
        };
        let port = port
            .map(|p| p.parse::<u16>().map_err(|_| bad()))
            .transpose()?;
        let (host, wildcard) = match host.strip_prefix("*.") {
            Some(h) => (h.to_owned(), true),
            None => (host, false),
        };
        if host.is_empty() || host.contains('*') {
            return Err(bad());
        }
        Ok(HostPattern {
            host,
            wildcard,
            port,
        })
    }

    fn matches(&self, host: &str, port: Option<u16>) -> bool {
        if self.port.is_some() && self.port != port {
            return false;
        }
        if self.wildcard {
            host.len() > self.host.len()
                && host.ends_with(&self.host)
                && host[..host.len() - self.host.len()].ends_with('.')
        } else {
            host == self.host
        }
    }
}

/// One provider's rules for the links its answers contain.
#[derive(Debug, Clone)]
pub struct Policy {
    allow_private_network: bool,
    hosts: Arc<[HostPattern]>,
}

impl Policy {
    /// `media_hosts` empty: any host (whose addresses pass the address check).
    pub fn new(allow_private_network: bool, media_hosts: &[String]) -> Result<Policy, String> {
        let hosts = media_hosts
            .iter()
            .map(|h| HostPattern::parse(h))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy {
            allow_private_network,
            hosts: hosts.into(),
        })
    }

    /// Checks one address a link leads to.
    fn check_ip(&self, ip: IpAddr) -> Result<(), AddrClass> {
        match classify(ip) {
            AddrClass::Public => Ok(()),
            c if self.allow_private_network && c.is_private_network() => Ok(()),
            c => Err(c),
        }
    }

    fn check_addr(&self, host: &str, ip: IpAddr) -> Result<(), Refused> {
        self.check_ip(ip).map_err(|class| Refused::Address {
            host: host.to_owned(),
            addr: ip,
            class: class.describe(),
        })
    }

    /// Everything that can be checked before connecting: scheme, user info, the allow-list,
    /// and a literal address. A name's addresses are checked by the client's resolver.
    fn check_url(&self, url: &Url) -> Result<(), Refused> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Refused::Scheme(url.scheme().chars().take(20).collect()));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Refused::Userinfo);
        }
        let host = url.host_str().ok_or(Refused::Invalid)?.to_ascii_lowercase();
        if !self.hosts.is_empty()
            && !self
                .hosts
                .iter()
                .any(|p| p.matches(&host, url.port_or_known_default()))
        {
            return Err(Refused::NotAllowed(host));
        }
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check_addr(&host, IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_addr(&host, IpAddr::V6(ip)),
            _ => Ok(()),
        }
    }

    /// Parses and checks a link from a provider's answer.
    pub fn parse_url(&self, link: &str) -> Result<Url, Refused> {
        let url = Url::parse(link).map_err(|_| Refused::Invalid)?;
        self.check_url(&url)?;
        Ok(url)
    }

    /// A client that fetches only what this policy allows: every name's addresses are
    /// checked by its resolver (and the connection made to one of those), every redirect is
    /// checked like the first link, and proxy variables are ignored.
    pub fn client(&self, builder: reqwest::ClientBuilder) -> reqwest::Result<reqwest::Client> {
        let redirects = self.clone();
        builder
            .no_proxy()
            .dns_resolver(Arc::new(Guarded {
                policy: self.clone(),
            }))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() > MAX_REDIRECTS {
                    return attempt.error(Refused::TooManyRedirects);
                }
                match redirects.check_url(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(e) => attempt.error(e),
                }
            }))
            .build()
    }
}

/// Where webhook deliveries may go. A tenant names the URL, so it is untrusted like a
/// provider's link: `https` only (plain `http` only to `http_hosts`), no user info, a port
/// from `ports` (any port for an `http_hosts` entry without one), and the same address
/// checks as media fetches, made by the client's resolver on the addresses it then connects
/// to. Redirects are never followed: a receiver that answers 3xx has not taken the event.
#[derive(Debug, Clone)]
pub struct WebhookPolicy {
    addresses: Policy,
    http_hosts: Arc<[HostPattern]>,
    ports: Arc<[u16]>,
}

impl WebhookPolicy {
    pub fn new(
        allow_private_network: bool,
        http_hosts: &[String],
        ports: &[u16],
    ) -> Result<WebhookPolicy, String> {
        let http_hosts = http_hosts
            .iter()
            .map(|h| HostPattern::parse(h))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(WebhookPolicy {
            addresses: Policy::new(allow_private_network, &[])?,
            http_hosts: http_hosts.into(),
            ports: ports.into(),
        })
    }

    /// Everything that can be checked before connecting (a literal address included); a
    /// name's addresses are checked by [`WebhookPolicy::client`]'s resolver.
    fn check_url(&self, url: &Url) -> Result<(), Refused> {
        let scheme = url.scheme();
        if !matches!(scheme, "http" | "https") {
            return Err(Refused::Scheme(scheme.chars().take(20).collect()));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Refused::Userinfo);
        }
        let host = url.host_str().ok_or(Refused::Invalid)?.to_ascii_lowercase();
        let port = url.port_or_known_default().ok_or(Refused::Invalid)?;
        let operator_host = self.http_hosts.iter().any(|p| p.matches(&host, Some(port)));
        if scheme == "http" && !operator_host {
            return Err(Refused::PlainHttp);
        }
        if !operator_host && !self.ports.contains(&port) {
            return Err(Refused::Port(port));
        }
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.addresses.check_addr(&host, IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.addresses.check_addr(&host, IpAddr::V6(ip)),
            _ => Ok(()),
        }
    }

    /// Parses and checks a tenant's webhook URL.
    pub fn parse_url(&self, link: &str) -> Result<Url, Refused> {
        let url = Url::parse(link).map_err(|_| Refused::Invalid)?;
        self.check_url(&url)?;
        Ok(url)
    }

    /// A client that connects only to checked addresses (resolved once, by its resolver),
    /// follows no redirect and ignores proxy variables.
    pub fn client(&self, builder: reqwest::ClientBuilder) -> reqwest::Result<reqwest::Client> {
        builder
            .no_proxy()
            .dns_resolver(Arc::new(Guarded {
                policy: self.addresses.clone(),
            }))
            .redirect(reqwest::redirect::Policy::none())
            .build()
    }
}

/// Resolves names and refuses any whose addresses are not all allowed.
struct Guarded {
    policy: Policy,
}

impl reqwest::dns::Resolve for Guarded {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // getaddrinfo on tokio's blocking pool, not on the executor.
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| Refused::Resolve {
                    host: host.clone(),
                    message: e.to_string(),
                })?
                .collect();
            if addrs.is_empty() {
                return Err(Refused::Resolve {
                    host,
                    message: "no addresses".into(),
                }
                .into());
            }
            // All or nothing: a name with one bad address among good ones is refused, so the
            // connector cannot fall through to the bad one.
            for a in &addrs {
                policy.check_addr(&host, a.ip())?;
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The policy's refusal inside a reqwest error (from the resolver or the redirect policy).
pub fn refusal(e: &reqwest::Error) -> Option<&Refused> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Refused>() {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

/// A URL a provider handed back for its own API (`urls.get`, `urls.cancel`): accepted only on
/// `base`'s origin (scheme, host and port), without user info, since the provider's key goes
/// with it.
pub fn on_origin(base: &Url, link: &str) -> Result<Url, Refused> {
    let url = Url::parse(link).map_err(|_| Refused::Invalid)?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Refused::Userinfo);
    }
    if url.origin() != base.origin() {
        let what = match url.host_str() {
            Some(h) => format!("host {h}"),
            None => "the link".to_owned(),
        };
        return Err(Refused::OffOrigin(what));
    }
    Ok(url)
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the response is larger than the {cap} byte limit")]
    TooLarge { cap: u64 },
    #[error("reading the response failed: {0}")]
    Body(#[source] reqwest::Error),
}

/// The whole body, or [`ReadError::TooLarge`] as soon as it passes `cap` (by its declared
/// length, or while reading: nothing past the cap is read).
pub async fn read_limited(mut resp: reqwest::Response, cap: u64) -> Result<Bytes, ReadError> {
    if resp.content_length().is_some_and(|n| n > cap) {
        return Err(ReadError::TooLarge { cap });
    }
    let initial = resp.content_length().unwrap_or(0).min(cap).min(1 << 20);
    let mut buf = BytesMut::with_capacity(initial as usize);
    while let Some(chunk) = resp.chunk().await.map_err(ReadError::Body)? {
        if buf.len() as u64 + chunk.len() as u64 > cap {
            return Err(ReadError::TooLarge { cap });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// At most the first `cap` bytes of the body (an error page: enough to quote, never more).
/// A failed read gives what arrived before it.
pub async fn read_prefix(mut resp: reqwest::Response, cap: usize) -> Bytes {
    let mut buf = BytesMut::new();
    while buf.len() < cap {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let take = chunk.len().min(cap - buf.len());
                buf.extend_from_slice(&chunk[..take]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    buf.freeze()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn class(s: &str) -> AddrClass {
        classify(s.parse().unwrap())
    }

    #[test]
    fn address_classes() {
        use AddrClass::*;
        for (addr, want) in [
            ("8.8.8.8", Public),
            ("1.1.1.1", Public),
            ("127.0.0.1", Loopback),
            ("127.255.0.9", Loopback),
            ("10.0.0.1", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("172.32.0.1", Public),
            ("192.168.1.1", Private),
            ("100.64.0.1", SharedCgnat),
            ("100.127.255.255", SharedCgnat),
            ("100.128.0.1", Public),
            ("169.254.169.254", Metadata),
            ("100.100.100.200", Metadata),
            ("169.254.1.1", LinkLocal),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("255.255.255.255", Broadcast),
            ("240.0.0.1", Reserved),
            ("192.0.0.192", Reserved),
            ("192.0.2.1", Reserved),
            ("198.18.0.1", Reserved),
            ("203.0.113.7", Reserved),
            ("::", Unspecified),
            ("::1", Loopback),
            ("2606:4700::1111", Public),
            ("fe80::1", LinkLocal),
            ("fc00::1", Private),
            ("fd12:3456::1", Private),
            ("fec0::1", Private),
            ("fd00:ec2::254", Metadata),
            ("ff02::1", Multicast),
            ("2001:db8::1", Reserved),
            ("2001:0:4136:e378::1", Reserved),
            ("3fff::1", Reserved),
            ("100::1", Reserved),
            ("4000::1", Reserved),
        ] {
            assert_eq!(class(addr), want, "{addr}");
        }
    }

    #[test]
    fn ipv6_forms_of_ipv4_addresses_are_judged_by_the_ipv4_address() {
        use AddrClass::*;
        for (addr, want) in [
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:7f00:1", Loopback),
            ("::ffff:169.254.169.254", Metadata),
            ("::ffff:10.1.2.3", Private),
            ("::ffff:8.8.8.8", Public),
            ("::127.0.0.1", Loopback),
            ("::10.0.0.1", Private),
            ("64:ff9b::7f00:1", Loopback),
            ("64:ff9b::a9fe:a9fe", Metadata),
            ("64:ff9b::808:808", Public),
            ("64:ff9b:1::1", Private),
            ("2002:7f00:1::", Loopback),
            ("2002:a9fe:a9fe::1", Metadata),
            ("2002:808:808::1", Public),
        ] {
            assert_eq!(class(addr), want, "{addr}");
        }
    }

    #[test]
    fn private_network_admits_only_networks_an_operator_may_own() {
        let open = Policy::new(true, &[]).unwrap();
        let closed = Policy::new(false, &[]).unwrap();
        for ok in ["127.0.0.1", "10.0.0.1", "100.64.0.1", "::1", "fd12::1"] {
            assert!(open.check_ip(ok.parse().unwrap()).is_ok(), "{ok}");
            assert!(closed.check_ip(ok.parse().unwrap()).is_err(), "{ok}");
        }
        for never in [
            "169.254.169.254",
            "169.254.3.3",
            "fd00:ec2::254",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "fe80::1",
        ] {
            assert!(open.check_ip(never.parse().unwrap()).is_err(), "{never}");
        }
        assert!(closed.check_ip("93.184.216.34".parse().unwrap()).is_ok());
    }

    #[test]
    fn urls_are_checked_for_scheme_userinfo_allow_list_and_literal_addresses() {
        let p = Policy::new(false, &[]).unwrap();
        let check = |p: &Policy, s: &str| p.parse_url(s).map(|_| ());
        assert_eq!(check(&p, "https://cdn.example.com/a.png"), Ok(()));
        assert!(matches!(
            check(&p, "file:///etc/passwd"),
            Err(Refused::Scheme(_))
        ));
        assert!(matches!(check(&p, "gopher://x/"), Err(Refused::Scheme(_))));
        assert_eq!(
            check(&p, "https://user:pw@cdn.example.com/a.png"),
            Err(Refused::Userinfo)
        );
        assert_eq!(
            check(&p, "https://user@cdn.example.com/"),
            Err(Refused::Userinfo)
        );
        for internal in [
            "http://127.0.0.1:9090/metrics",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://0x7f000001/",
            "http://2130706433/",
            "http://017700000001/",
            "http://0/",
            "http://10.1.1.1/",
        ] {
            assert!(
                matches!(check(&p, internal), Err(Refused::Address { .. })),
                "{internal}: {:?}",
                check(&p, internal)
            );
        }
        assert_eq!(check(&p, "not a url"), Err(Refused::Invalid));

        let listed = Policy::new(
            false,
            &[
                "replicate.delivery".into(),
                "*.blob.core.windows.net".into(),
                "media.example:8443".into(),
            ],
        )
        .unwrap();
        assert_eq!(check(&listed, "https://replicate.delivery/x.mp4"), Ok(()));
        assert_eq!(check(&listed, "https://REPLICATE.delivery/x.mp4"), Ok(()));
        assert_eq!(
            check(&listed, "https://a.b.blob.core.windows.net/x"),
            Ok(())
        );
        assert_eq!(check(&listed, "https://media.example:8443/x"), Ok(()));
        for refused in [
            "https://evil.example/x",
            "https://blob.core.windows.net/x",
            "https://evilblob.core.windows.net/x",
            "https://replicate.delivery.evil.example/x",
            "https://media.example/x",
        ] {
            assert!(
                matches!(check(&listed, refused), Err(Refused::NotAllowed(_))),
                "{refused}"
            );
        }
        for bad in ["", "http://x", "a/b", "*.", "x:notaport", "u@h"] {
            assert!(Policy::new(false, &[bad.into()]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn provider_urls_stay_on_the_providers_origin() {
        let base = Url::parse("https://api.replicate.com/v1").unwrap();
        assert!(on_origin(&base, "https://api.replicate.com/v1/predictions/abc").is_ok());
        assert!(on_origin(&base, "https://api.replicate.com:443/v1/predictions/abc").is_ok());
        for off in [
            "http://api.replicate.com/v1/predictions/abc",
            "https://api.replicate.com:8443/v1/x",
            "https://evil.example/v1/predictions/abc",
            "https://api.replicate.com.evil.example/x",
            "http://169.254.169.254/latest/meta-data/",
        ] {
            assert!(
                matches!(on_origin(&base, off), Err(Refused::OffOrigin(_))),
                "{off}"
            );
        }
        assert_eq!(
            on_origin(&base, "https://k:s@api.replicate.com/v1/x").map(|_| ()),
            Err(Refused::Userinfo)
        );
    }

    /// A one-shot HTTP server on loopback answering every connection with `answer`; returns
    /// its port and a counter of connections it accepted.
    async fn server(
        answer: String,
    ) -> (
        u16,
        Arc<std::sync::atomic::AtomicUsize>,
        tokio::task::JoinHandle<()>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = [0u8; 2048];
                let _ = c.read(&mut buf).await;
                let _ = c.write_all(answer.as_bytes()).await;
                let _ = c.shutdown().await;
            }
        });
        (port, hits, task)
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_of_internal_addresses_before_connecting() {
        let (port, hits, task) =
            server("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".into()).await;
        let closed = Policy::new(false, &[]).unwrap();
        let c = closed.client(reqwest::Client::builder()).unwrap();
        let e = c
            .get(format!("http://localhost:{port}/metrics"))
            .send()
            .await
            .unwrap_err();
        let r = refusal(&e).expect("a refusal in the error chain");
        assert!(matches!(r, Refused::Address { .. }), "{r}");
        assert!(r.to_string().contains("loopback"), "{r}");
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);

        // The same name is fetched when the private network is allowed: the refusal above
        // was the policy's, not a broken resolver.
        let open = Policy::new(true, &[]).unwrap();
        let c = open.client(reqwest::Client::builder()).unwrap();
        let r = c
            .get(format!("http://localhost:{port}/x"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), "ok");
        task.abort();
    }

    #[tokio::test]
    async fn every_redirect_is_checked_again() {
        let (target, target_hits, t1) =
            server("HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecret".into()).await;
        let (front, _, t2) = server(format!(
            "HTTP/1.1 302 Found\r\nlocation: http://localhost:{target}/metrics\r\ncontent-length: 0\r\n\r\n"
        ))
        .await;
        // The first hop is allowed (listed), the redirect's host is not.
        let p = Policy::new(true, &[format!("127.0.0.1:{front}")]).unwrap();
        let c = p.client(reqwest::Client::builder()).unwrap();
        let e = c
            .get(format!("http://127.0.0.1:{front}/img.png"))
            .send()
            .await
            .unwrap_err();
        assert!(matches!(refusal(&e), Some(Refused::NotAllowed(_))), "{e:?}");
        assert_eq!(target_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
        // A redirect to a user-info link is refused too.
        let (front2, _, t3) = server(format!(
            "HTTP/1.1 302 Found\r\nlocation: http://u:p@127.0.0.1:{target}/\r\ncontent-length: 0\r\n\r\n"
        ))
        .await;
        let p = Policy::new(true, &[]).unwrap();
        let c = p.client(reqwest::Client::builder()).unwrap();
        let e = c
            .get(format!("http://127.0.0.1:{front2}/"))
            .send()
            .await
            .unwrap_err();
        assert_eq!(refusal(&e), Some(&Refused::Userinfo), "{e:?}");
        assert_eq!(target_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
        for t in [t1, t2, t3] {
            t.abort();
        }
    }

    #[test]
    fn webhook_urls_refused_before_connecting() {
        let strict = WebhookPolicy::new(false, &[], &[443]).unwrap();
        let refused = |p: &WebhookPolicy, u: &str| p.parse_url(u).unwrap_err();
        assert!(strict.parse_url("https://hooks.example.com/volley").is_ok());
        assert_eq!(
            refused(&strict, "http://hooks.example.com/"),
            Refused::PlainHttp
        );
        assert_eq!(
            refused(&strict, "https://hooks.example.com:8443/"),
            Refused::Port(8443)
        );
        assert_eq!(
            refused(&strict, "https://hooks.example.com:22/"),
            Refused::Port(22)
        );
        assert_eq!(
            refused(&strict, "https://u:p@hooks.example.com/"),
            Refused::Userinfo
        );
        assert!(matches!(
            refused(&strict, "ftp://hooks.example.com/"),
            Refused::Scheme(_)
        ));
        assert_eq!(refused(&strict, "/relative"), Refused::Invalid);
        assert_eq!(refused(&strict, "not a url"), Refused::Invalid);
        for (url, class) in [
            ("https://127.0.0.1/", "loopback"),
            ("https://[::1]/", "loopback"),
            ("https://10.1.2.3/", "private"),
            ("https://192.168.0.10/", "private"),
            ("https://172.16.5.4/", "private"),
            ("https://169.254.1.1/", "link-local"),
            (
                "https://169.254.169.254/latest/meta-data/",
                "cloud metadata",
            ),
            ("https://[fd00:ec2::254]/", "cloud metadata"),
            ("https://224.0.0.1/", "multicast"),
            ("https://[ff02::1]/", "multicast"),
            ("https://0.0.0.0/", "unspecified"),
            ("https://100.64.0.1/", "shared (CGNAT)"),
        ] {
            match refused(&strict, url) {
                Refused::Address { class: c, .. } => assert_eq!(c, class, "{url}"),
                other => panic!("{url}: {other}"),
            }
        }
        // The operator's allowances: plain http (any port) to listed hosts, more ports, and
        // the private network; link-local and metadata stay refused whatever they say.
        let dev = WebhookPolicy::new(true, &["127.0.0.1".into()], &[443, 8443]).unwrap();
        assert!(dev.parse_url("http://127.0.0.1:4567/hook").is_ok());
        assert!(dev.parse_url("https://hooks.example.com:8443/").is_ok());
        assert_eq!(refused(&dev, "http://localhost:4567/"), Refused::PlainHttp);
        assert!(dev.parse_url("https://10.0.0.5/").is_ok());
        assert!(matches!(
            refused(&dev, "https://169.254.169.254/"),
            Refused::Address { .. }
        ));
        // A listed host with a port allows that port only.
        let one = WebhookPolicy::new(true, &["127.0.0.1:9000".into()], &[443]).unwrap();
        assert!(one.parse_url("http://127.0.0.1:9000/").is_ok());
        assert_eq!(refused(&one, "http://127.0.0.1:9001/"), Refused::PlainHttp);
        assert!(WebhookPolicy::new(false, &["a/b".into()], &[443]).is_err());
    }

    #[tokio::test]
    async fn webhook_client_checks_resolved_addresses_and_follows_no_redirect() {
        let (port, hits, task) =
            server("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".into()).await;
        // `localhost` passes the URL check (a name, plain http allowed for it) but resolves
        // to loopback, which this policy refuses: nothing is sent.
        let closed = WebhookPolicy::new(false, &["localhost".into()], &[443]).unwrap();
        let url = format!("http://localhost:{port}/hook");
        assert!(closed.parse_url(&url).is_ok());
        let c = closed.client(reqwest::Client::builder()).unwrap();
        let e = c.post(&url).send().await.unwrap_err();
        let r = refusal(&e).expect("a refusal in the error chain");
        assert!(r.to_string().contains("loopback"), "{r}");
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
        let (front, _, t2) = server(format!(
            "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://127.0.0.1:{port}/\r\ncontent-length: 0\r\n\r\n"
        ))
        .await;
        let open = WebhookPolicy::new(true, &["127.0.0.1".into()], &[443]).unwrap();
        let c = open.client(reqwest::Client::builder()).unwrap();
        let r = c
            .post(format!("http://127.0.0.1:{front}/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 307);
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
        task.abort();
        t2.abort();
    }

    #[tokio::test]
    async fn bodies_are_read_up_to_the_cap_only() {
        let (port, _, task) = server(format!(
            "HTTP/1.1 200 OK\r\ncontent-length: 4000\r\n\r\n{}",
            "x".repeat(4000)
        ))
        .await;
        let (chunked, _, task2) = server(format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{}0\r\n\r\n",
            "3e8\r\n".to_owned() + &"y".repeat(1000) + "\r\n"
        ))
        .await;
        let c = reqwest::Client::new();
        let get = |p: u16| c.get(format!("http://127.0.0.1:{p}/")).send();
        assert!(matches!(
            read_limited(get(port).await.unwrap(), 3999).await,
            Err(ReadError::TooLarge { cap: 3999 })
        ));
        assert_eq!(
            read_limited(get(port).await.unwrap(), 4000)
                .await
                .unwrap()
                .len(),
            4000
        );
        // No declared length: stopped while reading.
        assert!(matches!(
            read_limited(get(chunked).await.unwrap(), 999).await,
            Err(ReadError::TooLarge { cap: 999 })
        ));
        assert_eq!(read_prefix(get(port).await.unwrap(), 10).await.len(), 10);
        assert_eq!(
            read_prefix(get(chunked).await.unwrap(), 5000).await.len(),
            1000
        );
        task.abort();
        task2.abort();
    }
}
