#!/usr/bin/env python3
"""Writes the committed seed corpora, fuzz/corpus/<target>/<name>: the RFC and
specification examples and inputs from the tests. Run from anywhere; rewrites the files
it names and leaves others (inputs added by hand) alone."""
import os
import socket
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
BOM = b"\xef\xbb\xbf"


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


# RFC 5424 §6.5 examples 1-4.
RFC5424 = [
    b"<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - " + BOM
    + b"'su root' failed for lonvick on /dev/pts/8",
    b"<165>1 2003-08-24T05:14:15.000003-07:00 192.0.2.1 myproc 8710 - - %% It's time to make the do-nuts.",
    b'<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut="3" '
    b'eventSource="Application" eventID="1011"] ' + BOM + b"An application event log entry...",
    b'<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut="3" '
    b'eventSource="Application" eventID="1011"][examplePriority@32473 class="high"]',
]
# RFC 3164 §5.4 examples 1-4 (2 and 3 are the same text with and without PRI).
RFC3164 = [
    b"<34>Oct 11 22:14:15 mymachine su: 'su root' failed for lonvick on /dev/pts/8",
    b"Use the BFG!",
    b"<13>Feb  5 17:32:18 10.0.0.99 Use the BFG!",
    b"<165>Aug 24 05:34:00 CST 1987 mymachine myproc[10]: %% It's time to make the do-nuts.  %%  "
    b"Ingredients: Mix=OK, Jelly=OK # Devices: Mixer=OK, Jelly_Injector=OK, Frier=OK # Transport: "
    b"Conveyer1=OK, Conveyer2=OK # %%",
    b"<0>1990 Oct 22 10:52:01 TZ-6 scapegoat.dmz.example.org 10.1.2.3 sched[0]: That's All Folks!",
]
OTHER_LINES = {
    "cisco": b"<189>52: *Mar  1 00:00:51.123: %SYS-5-CONFIG_I: Configured from console by vty0 (10.0.0.1)",
    "systemd": b"<30>Dec  8 10:00:00 web1 systemd[1]: Started nginx.service - A high performance web server.",
    "kernel": b"<4>Dec  8 10:00:01 web1 kernel: [12345.678901] eth0: link up",
    "json_names": b'{"host":"web1","app":"nginx","level":"error","msg":"upstream timed out","ts":"2026-12-08T10:00:00.123Z"}',
    "json_aliases": b'{"hostname":"db","service":"pg","severity":3,"message":"checkpoint","timestamp":1796688000.5}',
    "json_escapes": b'{"msg":"tab\\there \\u00e9 \\ud83d\\ude00","@timestamp":1796688000123,"lvl":"warn"}',
    "plain": b"nginx: 10.0.0.1 - - [08/Dec/2026:10:00:00 +0000] \"GET / HTTP/1.1\" 200 612",
    "not_utf8": b"<13>Dec  8 10:00:00 host app: \xff\xfe broken \xc3",
}

for i, line in enumerate(RFC5424, 1):
    write("log_decode", f"rfc5424_6.5_ex{i}", line)
for name, line in zip(["ex1", "ex2_no_pri", "ex2", "ex3", "ex4"], RFC3164):
    write("log_decode", f"rfc3164_5.4_{name}", line)
for name, line in OTHER_LINES.items():
    write("log_decode", name, line)

# Framing: first byte picks the maximum length (255 = the default 8 KiB).
octet = lambda m: str(len(m)).encode() + b" " + m
write("syslog_framing", "rfc6587_octet_counted", b"\xff" + octet(RFC5424[0]) + octet(RFC5424[2]))
write("syslog_framing", "newlines_crlf_nul", b"\xff" + RFC3164[0] + b"\r\n" + RFC3164[2] + b"\n\n" + RFC3164[4] + b"\x00")
write("syslog_framing", "truncated_at_16", b"\x10" + RFC5424[1] + b"\n" + octet(RFC5424[3]))
write("syslog_framing", "number_not_a_frame", b"\xff404 not found\n12 <13>short\n")

# PROXY protocol (HAProxy's doc/proxy-protocol.txt).
V2SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(cmd, fam, addr, tlvs=b""):
    body = addr + tlvs
    return V2SIG + bytes([0x20 | cmd, fam]) + struct.pack(">H", len(body)) + body


def tlv(t, v):
    return bytes([t]) + struct.pack(">H", len(v)) + v


ip4 = socket.inet_aton
ip6 = lambda a: socket.inet_pton(socket.AF_INET6, a)
ssl = tlv(0x20, b"\x07" + struct.pack(">I", 0) + tlv(0x21, b"TLSv1.3") + tlv(0x22, b"client.example") + tlv(0x23, b"TLS_AES_128_GCM_SHA256"))
tlvs = tlv(0x01, b"h2") + tlv(0x02, b"example.com") + tlv(0x03, b"\x00\x00\x00\x00") + tlv(0x04, b"") + tlv(0x05, b"id-1234") + ssl + tlv(0x30, b"netns0")
write("proxy_protocol", "v1_tcp4_with_request", b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n")
write("proxy_protocol", "v1_tcp6_longest",
      b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")
write("proxy_protocol", "v1_unknown", b"PROXY UNKNOWN\r\n")
write("proxy_protocol", "v1_unknown_longest",
      b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")
write("proxy_protocol", "v2_tcp4_tlvs", v2(1, 0x11, ip4("192.0.2.1") + ip4("198.51.100.7") + struct.pack(">HH", 56324, 443), tlvs) + b"GET / HTTP/1.1\r\n")
write("proxy_protocol", "v2_tcp6", v2(1, 0x21, ip6("2001:db8::1") + ip6("2001:db8::2") + struct.pack(">HH", 40000, 8443)))
write("proxy_protocol", "v2_udp4", v2(1, 0x12, ip4("10.0.0.1") + ip4("10.0.0.2") + struct.pack(">HH", 5353, 53)))
write("proxy_protocol", "v2_unix_stream", v2(1, 0x31, b"/run/src.sock".ljust(108, b"\0") + b"/run/dst.sock".ljust(108, b"\0")))
write("proxy_protocol", "v2_local", v2(0, 0x00, b""))

# Policy: first byte 0 = default limits; with the top bit set, small ones.
README_POLICY = '''default   = "pass"   # IP packets no rule matches (pass | drop); default pass
malformed = "pass"   # frames that fail to parse (pass | drop); default pass
non_ip    = "pass"   # ARP and other non-IP frames (pass | drop); rules only match IP

[[rule]]
name = "block-scanners"               # optional; default "ruleN"; unique
src = ["198.51.100.0/24", "2001:db8:bad::/48"]   # IPv4 and IPv6 may be mixed
action = "drop"

[[rule]]
name = "syslog"
proto = "udp"                          # tcp, udp, icmp, icmpv6, a number 0..=255, or a list
dst_port = [514, "5140-5150"]          # a port, "lo-hi", or a list of them
action = "capture"
capture_max = 2048                     # bytes of UDP payload, 1..=4096; default 2048
then = "drop"                          # drop (default) or pass after capturing

[[rule]]
name = "dns"
proto = "udp"
dst_port = 53
action = "sample"
rate = "1/1000"                        # 1/N, or a percentage down to 0.001%
snap = 128                             # bytes of the frame, 1..=256; default 128
'''
write("policy_toml", "readme", b"\x00" + README_POLICY.encode())
write("policy_toml", "readme_small_limits", b"\x81" + README_POLICY.encode())
write("policy_toml", "inline_rules",
      b"\x00" + b'default = "drop"\nrule = [{ name = "web", proto = "tcp", dst_port = [80, 443], action = "pass" },'
      b' { src = "10.0.0.0/8", dst = ["2001:db8::/32", "192.0.2.7"], proto = [6, "icmpv6"], src_port = "1024-65535", action = "sample", rate = "0.5%", snap = 64 }]\n')
write("policy_toml", "sample_all", b"\x00" + b'[[rule]]\nproto = "tcp"\ndst_port = 8080\naction = "sample"\nrate = "100%"\nsnap = 128\n')
write("policy_toml", "bad_host_bits", b"\x00" + b'[[rule]]\nsrc = "10.0.0.1/8"\naction = "drop"\n')
write("policy_toml", "bad_overlapping_ports", b"\x00" + b'[[rule]]\nproto = "tcp"\ndst_port = ["1000-2000", 1500]\naction = "drop"\n')

# Configuration: `edgeproxy config defaults` and the README's examples.
write("config_toml", "defaults", open(os.path.join(os.path.dirname(ROOT), "..", "proxy-user", "src", "config", "mod.rs")).read()
      .split('pub const DEFAULTS: &str = r#"', 1)[1].split('"#;', 1)[0])
write("config_toml", "logs_sinks", '''[engine]
kind = "io_uring"
buffer_size = 9216
data_cpus = [0]

[[listener]]
address = "127.0.0.1:5514"
rcvbuf = 8388608

[window]
seconds = 10
key = ["host", "app", "severity", "facility", "source"]
top_k = 20

[[sink]]
kind = "file"
what = "both"
format = "text"
path = "/var/log/edgeproxy/windows.log"
rotate_bytes = 104857600
rotate_seconds = 3600
keep = 5
fsync = "never"

[[sink]]
kind = "tcp"
address = "10.0.0.5:6514"
what = "raw"
format = "rfc5424"
spool_dir = "/var/lib/edgeproxy/spool"
max_spool_bytes = 1073741824
''')
write("config_toml", "tcp_routes", '''[tcp]
copy = "buffers"
buffer_size = 32768
buffers = 128
zero_copy = "off"

[[route]]
name = "web"
listen = "0.0.0.0:8080"
upstreams = ["10.0.0.1:80", "[2001:db8::1]:80"]
balance = "maglev"
connect_timeout = 5.0
idle_timeout = 300.0
send_proxy = "v2"
accept_proxy = true
proxy_header_timeout = 5.0
eject_after = 3
eject_seconds = 10

[[route.upstream]]
address = "10.0.0.3:80"
weight = 2
max_connections = 1000

[route.health]
interval = 2.0
timeout = 1.0
rise = 2
fall = 3
''')
write("config_toml", "bad_values", '[engine]\nkind = "dpdk"\nbuffers = 1000\n[window]\nseconds = -1\nkey = ["nope"]\n')

# Admin endpoint request heads.
write("admin_http", "metrics", b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9100\r\nUser-Agent: Prometheus/2.53.0\r\nAccept: text/plain;version=0.0.4\r\n\r\n")
write("admin_http", "healthz_head", b"HEAD /healthz HTTP/1.0\r\n\r\n")
write("admin_http", "ready_query", b"GET /ready?verbose=1 HTTP/1.1\r\nHost: node\r\n\r\n")
write("admin_http", "post_metrics", b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
write("admin_http", "absolute_form", b"GET http://127.0.0.1:9100/metrics HTTP/1.1\r\n\r\n")

# Sampled frames: Ethernet, optional VLAN tags, IPv4 (with options) or IPv6, TCP, HTTP.
REQ = b"GET /index.html?q=1 HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n"


def tcp(payload):
    return struct.pack(">HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, 0x18, 65535, 0, 0) + payload


def eth(ethertype, l3, vlans=()):
    head = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01"
    for tpid, vid in vlans:
        head += struct.pack(">HH", tpid, vid)
    return head + struct.pack(">H", ethertype) + l3


def ipv4(payload, options=b""):
    ihl = 5 + len(options) // 4
    return struct.pack(">BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(options) + len(payload), 1, 0x4000, 64, 6, 0,
                       ip4("192.0.2.1"), ip4("192.0.2.80")) + options + payload


def ipv6(payload):
    return struct.pack(">IHBB16s16s", 6 << 28, len(payload), 6, 64, ip6("2001:db8::1"), ip6("2001:db8::80")) + payload


write("http_sample", "ipv4_get", eth(0x0800, ipv4(tcp(REQ))))
write("http_sample", "ipv4_options_snap128", eth(0x0800, ipv4(tcp(REQ), options=b"\x01\x01\x01\x00"))[:128])
write("http_sample", "ipv6_post", eth(0x86DD, ipv6(tcp(b"POST /api/v1/items HTTP/1.0\r\nhost: api\r\n\r\n"))))
write("http_sample", "qinq_head", eth(0x0800, ipv4(tcp(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")), vlans=[(0x88A8, 10), (0x8100, 20)]))
