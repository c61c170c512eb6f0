//! What the per-packet logic needs from the hook it runs in, so XDP and TC share it.
use aya_ebpf::{
    EbpfContext,
    bindings::__sk_buff,
    helpers::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};

use crate::parse::Frame;

pub trait Hook: Frame + EbpfContext {
    /// The packet's full length (for TC including any non-linear part).
    fn wire_len(&self) -> u32;
    fn ifindex(&self) -> u32;
    fn rx_queue(&self) -> u32;
    /// Copies `len` bytes at `off` of the packet to `dst`; 0 on success.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` bytes.
    unsafe fn load_bytes(&self, off: u32, dst: *mut u8, len: u32) -> i64;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
}

impl Hook for XdpContext {
    #[inline(always)]
    fn wire_len(&self) -> u32 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }
    #[inline(always)]
    fn rx_queue(&self) -> u32 {
        self.rx_queue_index()
    }
    #[inline(always)]
    unsafe fn load_bytes(&self, off: u32, dst: *mut u8, len: u32) -> i64 {
        // SAFETY: the caller guarantees `dst` is valid for `len` bytes; the helper
        // bounds-checks `off`/`len` against the packet itself.
        unsafe { bpf_xdp_load_bytes(self.ctx, off, dst.cast(), len) }
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
}

impl Hook for TcContext {
    #[inline(always)]
    fn wire_len(&self) -> u32 {
        self.len()
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the context pointer of a TC program is its __sk_buff.
        unsafe { (*(self.as_ptr() as *const __sk_buff)).ifindex }
    }
    #[inline(always)]
    fn rx_queue(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*(self.as_ptr() as *const __sk_buff)).queue_mapping }
    }
    #[inline(always)]
    unsafe fn load_bytes(&self, off: u32, dst: *mut u8, len: u32) -> i64 {
        // SAFETY: as for XDP; the helper also reads non-linear data.
        unsafe { bpf_skb_load_bytes(self.as_ptr(), off, dst.cast(), len) }
    }
}
