//! The egress side: which targets may be dialled ([`policy`]), name resolution
//! ([`resolve`]) and the dialler that answers every stream open ([`dial`]).

pub mod dial;
pub mod policy;
pub mod resolve;

pub use dial::{Dialer, DEFAULT_CONNECT_TIMEOUT, DEFAULT_DIAL_DEADLINE};
pub use policy::{
    embedded_ipv4, Cidr, Denied, EgressPolicy, EgressRule, HostPattern, PortRange, RangeKind,
};
pub use resolve::Resolver;
