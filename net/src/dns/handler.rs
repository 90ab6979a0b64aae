//! One query packet in, at most one answer packet out, whatever the bytes: what the UDP and TCP
//! servers share.

use super::answer::Zone;
use super::forward::Forwarder;
use crate::endpoint::Endpoints;
use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::RecordType;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// The largest query accepted, over either transport. Queries are a few hundred bytes.
pub(crate) const MAX_QUERY: usize = 4096;
/// The UDP payload size the responder advertises in its EDNS answers (DNS flag day 2020).
const OUR_UDP_PAYLOAD: u16 = 1232;
/// The UDP answer size without EDNS (RFC 1035).
const PLAIN_UDP_LIMIT: usize = 512;
/// The largest UDP answer sent, whatever a client advertises.
const MAX_UDP_ANSWER: usize = 4096;

/// How the query came, which decides how large its answer may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

/// What to do with a packet.
pub(crate) enum Outcome {
    /// Send this answer.
    Reply(Vec<u8>),
    /// Not in the zone: forward this query.
    Forward(Box<Message>),
    /// Send nothing (not a query, or not even a DNS header).
    Drop,
}

/// The state every query reads: the zone, the current endpoints, the upstreams.
pub(crate) struct Handler {
    zone: Zone,
    endpoints: watch::Receiver<Endpoints>,
    forwarder: Forwarder,
    forwards: Arc<Semaphore>,
    rotation: AtomicUsize,
}

impl Handler {
    pub(crate) fn new(
        zone: Zone,
        endpoints: watch::Receiver<Endpoints>,
        forwarder: Forwarder,
        max_forwards: usize,
    ) -> Self {
        Handler {
            zone,
            endpoints,
            forwarder,
            forwards: Arc::new(Semaphore::new(max_forwards)),
            rotation: AtomicUsize::new(0),
        }
    }

    /// The answer to `packet`, forwarding it if it is not in the zone.
    pub(crate) async fn handle(&self, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
        match self.decide(packet, transport) {
            Outcome::Reply(reply) => Some(reply),
            Outcome::Drop => None,
            Outcome::Forward(query) => self.forward(&query, transport).await,
        }
    }

    /// What to do with `packet`, without waiting on anything.
    pub(crate) fn decide(&self, packet: &[u8], transport: Transport) -> Outcome {
        if packet.len() > MAX_QUERY {
            log::debug!(
                "dns: dropping an oversized packet of {} bytes",
                packet.len()
            );
            return Outcome::Drop;
        }
        let Ok(header) = Header::read(&mut BinDecoder::new(packet)) else {
            return Outcome::Drop;
        };
        if header.metadata.message_type != MessageType::Query {
            return Outcome::Drop;
        }
        let request = match Message::from_vec(packet) {
            Ok(request) => request,
            Err(e) => {
                log::debug!("dns: malformed query {}: {e}", header.metadata.id);
                return self.error(&header_only(header), ResponseCode::FormErr, transport);
            }
        };
        if request.metadata.op_code != OpCode::Query {
            return self.error(&request, ResponseCode::NotImp, transport);
        }
        // RFC 6891 6.1.3: only EDNS version 0 exists.
        if request.edns.as_ref().is_some_and(|edns| edns.version() > 0) {
            return self.error(&request, ResponseCode::BADVERS, transport);
        }
        let [query] = request.queries.as_slice() else {
            return self.error(&request, ResponseCode::FormErr, transport);
        };
        // Only the queries whose answers rotate turn the rotation: a stub resolver asks for A and
        // AAAA for every lookup, and counting both would give it the same order every time.
        let rotate = if matches!(
            query.query_type(),
            RecordType::A | RecordType::SRV | RecordType::ANY
        ) {
            self.rotation.fetch_add(1, Ordering::Relaxed)
        } else {
            self.rotation.load(Ordering::Relaxed)
        };
        // One snapshot for the whole answer: the borrow ends before anything awaits.
        let answer = {
            let endpoints = self.endpoints.borrow();
            self.zone.answer(
                query.name(),
                query.query_type(),
                query.query_class(),
                &endpoints,
                rotate,
            )
        };
        let Some(answer) = answer else {
            return Outcome::Forward(Box::new(request));
        };
        let mut response = response_to(&request, answer.rcode);
        response.metadata.authoritative = answer.rcode != ResponseCode::Refused;
        response.answers = answer.answers;
        response.authorities = answer.authorities;
        response.additionals = answer.additionals;
        encode(response, &request, transport).map_or(Outcome::Drop, Outcome::Reply)
    }

    /// The upstreams' answer to `query`, SERVFAIL if none answers or too many are under way.
    pub(crate) async fn forward(&self, query: &Message, transport: Transport) -> Option<Vec<u8>> {
        match self.forward_permit() {
            Some(permit) => self.forward_holding(query, transport, permit).await,
            None => self.too_busy(query, transport),
        }
    }

    /// A place among the forwards under way, if one is free.
    pub(crate) fn forward_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.forwards.clone().try_acquire_owned().ok()
    }

    /// The SERVFAIL answer to a query that finds no free place to be forwarded.
    pub(crate) fn too_busy(&self, query: &Message, transport: Transport) -> Option<Vec<u8>> {
        log::warn!("dns: too many forwarded queries under way; answering SERVFAIL");
        self.servfail(query, transport)
    }

    /// The upstreams' answer to `query`, holding `_permit` (a place among the forwards) until
    /// it is in.
    pub(crate) async fn forward_holding(
        &self,
        query: &Message,
        transport: Transport,
        _permit: OwnedSemaphorePermit,
    ) -> Option<Vec<u8>> {
        let whole = transport == Transport::Tcp;
        match self.forwarder.forward(query, whole).await {
            Ok(reply) => fit_forwarded(reply, query, transport),
            Err(e) => {
                log::warn!("dns: cannot forward {}: {e}", describe(query));
                self.servfail(query, transport)
            }
        }
    }

    fn servfail(&self, query: &Message, transport: Transport) -> Option<Vec<u8>> {
        match self.error(query, ResponseCode::ServFail, transport) {
            Outcome::Reply(reply) => Some(reply),
            _ => None,
        }
    }

    fn error(&self, request: &Message, rcode: ResponseCode, transport: Transport) -> Outcome {
        encode(response_to(request, rcode), request, transport)
            .map_or(Outcome::Drop, Outcome::Reply)
    }
}

/// A request made of a header alone, to answer FORMERR to.
fn header_only(header: Header) -> Message {
    let mut message = Message::new(
        header.metadata.id,
        MessageType::Query,
        header.metadata.op_code,
    );
    message.metadata = header.metadata;
    message
}

/// An empty response to `request` with `rcode`: its id, question, RD and CD bits, and an OPT
/// record when it had one.
fn response_to(request: &Message, rcode: ResponseCode) -> Message {
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.checking_disabled = request.metadata.checking_disabled;
    response.metadata.recursion_available = true;
    response.metadata.response_code = rcode;
    response.queries = request.queries.clone();
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(OUR_UDP_PAYLOAD);
        response.edns = Some(edns);
    }
    response
}

/// The largest answer `request`'s client takes over `transport`: over UDP 512 bytes or its EDNS
/// size, over TCP what a length prefix can say.
fn limit(request: &Message, transport: Transport) -> usize {
    match (&request.edns, transport) {
        (_, Transport::Tcp) => usize::from(u16::MAX),
        (Some(edns), Transport::Udp) => {
            usize::from(edns.max_payload()).clamp(PLAIN_UDP_LIMIT, MAX_UDP_ANSWER)
        }
        (None, Transport::Udp) => PLAIN_UDP_LIMIT,
    }
}

/// `response` encoded to fit the client's limit: beyond it, first without the additional
/// section (RFC 2181 9), then without any record and with the TC bit set.
fn encode(mut response: Message, request: &Message, transport: Transport) -> Option<Vec<u8>> {
    let limit = limit(request, transport);
    let bytes = to_vec(&response)?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    if !response.additionals.is_empty() {
        response.additionals.clear();
        let bytes = to_vec(&response)?;
        if bytes.len() <= limit {
            return Some(bytes);
        }
    }
    to_vec(&response.truncate())
}

fn to_vec(message: &Message) -> Option<Vec<u8>> {
    match message.to_vec() {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            log::error!(
                "dns: cannot encode the answer to {}: {e}",
                describe(message)
            );
            None
        }
    }
}

/// An upstream's answer as the client may have it: over UDP, truncated if beyond its limit.
fn fit_forwarded(reply: Vec<u8>, query: &Message, transport: Transport) -> Option<Vec<u8>> {
    if reply.len() <= limit(query, transport) {
        return Some(reply);
    }
    let message = Message::from_vec(&reply).ok()?;
    to_vec(&message.truncate())
}

fn describe(message: &Message) -> String {
    match message.queries.first() {
        Some(q) => format!("{} {}", q.name(), q.query_type()),
        None => format!("query {}", message.metadata.id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{Instance, Port, Proto};
    use hickory_proto::op::Query;
    use hickory_proto::rr::{Name, RecordType};
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn handler(instances: u8) -> Handler {
        let mut e = Endpoints::default();
        for n in 0..instances {
            let instance = Instance {
                id: format!("m{n}"),
                address: Ipv4Addr::new(10, 42, n, 2),
                ports: vec![Port {
                    name: Some("http".into()),
                    port: 80,
                    proto: Proto::Tcp,
                }],
                machine: format!("m{n}"),
                revision: 1,
            };
            e.insert("web", instance);
        }
        let (_tx, rx) = watch::channel(e);
        let zone = Zone::new("caisson.", 5, 2).unwrap();
        Handler::new(
            zone,
            rx,
            Forwarder::new(vec![], Duration::from_millis(10)),
            4,
        )
    }

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn reply(h: &Handler, packet: &[u8], transport: Transport) -> Message {
        match h.decide(packet, transport) {
            Outcome::Reply(r) => Message::from_vec(&r).unwrap(),
            Outcome::Forward(_) => panic!("forwarded"),
            Outcome::Drop => panic!("dropped"),
        }
    }

    #[test]
    fn a_zone_answer_is_authoritative_and_keeps_the_id() {
        let h = handler(2);
        let q = query("web.caisson.", RecordType::A);
        let r = reply(&h, &q, Transport::Udp);
        assert_eq!(r.metadata.id, Message::from_vec(&q).unwrap().metadata.id);
        assert!(r.metadata.authoritative);
        assert_eq!(r.answers.len(), 2);
    }

    #[test]
    fn too_many_records_for_udp_set_the_tc_bit_and_tcp_gets_them_all() {
        let h = handler(60);
        let q = query("web.caisson.", RecordType::A);
        let udp = reply(&h, &q, Transport::Udp);
        assert!(udp.metadata.truncation);
        assert!(udp.answers.is_empty());
        let tcp = reply(&h, &q, Transport::Tcp);
        assert!(!tcp.metadata.truncation);
        assert_eq!(tcp.answers.len(), 60);
    }

    #[test]
    fn a_header_with_garbage_after_it_is_formerr_and_no_header_is_silence() {
        let h = handler(1);
        let mut q = query("web.caisson.", RecordType::A);
        q.truncate(15);
        let r = reply(&h, &q, Transport::Udp);
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        assert!(matches!(h.decide(&q[..11], Transport::Udp), Outcome::Drop));
        assert!(matches!(
            h.decide(&[0; MAX_QUERY + 1], Transport::Udp),
            Outcome::Drop
        ));
    }

    #[test]
    fn names_outside_the_zone_are_forwarded_and_servfail_without_upstreams() {
        let h = handler(1);
        let q = query("example.org.", RecordType::A);
        assert!(matches!(h.decide(&q, Transport::Udp), Outcome::Forward(_)));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = rt.block_on(h.handle(&q, Transport::Udp)).unwrap();
        let r = Message::from_vec(&r).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    }

    /// Random bytes, and valid queries with random bytes changed, never panic the handler,
    /// and whatever it answers decodes.
    #[test]
    fn random_and_mangled_packets_never_crash_it() {
        let h = handler(3);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let seeds = [
            query("web.caisson.", RecordType::A),
            query("_http._tcp.web.caisson.", RecordType::SRV),
            query("example.org.", RecordType::MX),
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000 {
            let packet: Vec<u8> = if round % 2 == 0 {
                let len = (next() % 600) as usize;
                (0..len).map(|_| next() as u8).collect()
            } else {
                let mut p = seeds[round % 3].clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % p.len();
                    p[at] = next() as u8;
                }
                p
            };
            for transport in [Transport::Udp, Transport::Tcp] {
                if let Some(r) = rt.block_on(h.handle(&packet, transport)) {
                    Message::from_vec(&r).unwrap();
                    if transport == Transport::Udp {
                        assert!(r.len() <= MAX_UDP_ANSWER);
                    }
                }
            }
        }
    }
}
