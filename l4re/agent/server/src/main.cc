/*
 * l4vagent: the L4Re end of the l4vctl bridge.
 *
 * A dumb marshaller.  It owns a 16550 UART (the link to the host), the
 * L4-VIRTIO device capabilities it was started with, and the objects the
 * host asks it to create.  It executes what arrives in remote-profile frames
 * (docs/wire-protocol.md of l4vctl): IPC calls with message registers laid
 * out by the host, reads and writes of dataspace ranges, IRQ triggers; and
 * it reports IRQs that fire as events.  It never interprets a config page or
 * a ring: every protocol decision is the host's.
 *
 * Usage (ned): rom/l4vagent [-p PORT] [-i IRQ] [-b DIVISOR] NAME...
 * NAME is a capability name in the environment naming an L4-VIRTIO device.
 */

#include <l4/io/io.h>
#include <l4/re/c/dataspace.h>
#include <l4/re/c/mem_alloc.h>
#include <l4/re/c/rm.h>
#include <l4/re/c/util/cap_alloc.h>
#include <l4/re/env.h>
#include <l4/sys/factory.h>
#include <l4/sys/ipc.h>
#include <l4/sys/irq.h>
#include <l4/sys/rcv_endpoint.h>
#include <l4/sys/task.h>
#include <l4/sys/utcb.h>
#include <l4/util/port_io.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

namespace {

// ---- constants of the link and frame layers --------------------------------

enum : unsigned
{
  Link_hdr = 14,         // sync 2, type 1, version 1, length 4, crc 4, check 2
  Link_type_wire = 1,
  Link_version = 1,
  Max_payload = 16384,   // the largest wire frame the agent takes or sends
  Frame_hdr = 32,
  Cap_item = 16,
  Max_words = 256,
  Max_caps = 8,
  Wire_version = 1,
  Profile_remote = 2,

  K_hello = 1, K_welcome = 2, K_request = 3, K_reply = 4,
  K_read = 5, K_write = 6, K_trigger = 7, K_event = 8, K_bye = 9,

  Label_agent = 0x4c41,  // control requests to the agent itself (target 0)
  Op_list = 0, Op_alloc_ds = 1, Op_irq_create = 2, Op_release = 3,
  Op_stats = 4, Op_echo = 5, Op_reset = 6, Op_note = 7,

  Cap_none = 0, Cap_ds = 1, Cap_irq = 2, Cap_device = 3,

  Max_handles = 96,
  Max_devices = 16,
  Max_expand = 65536,    // bytes a READ may ask for / a WRITE may expand to
  Max_alloc = 64u << 20,
  Idle_ms = 500,         // a partial frame older than this (no byte arriving) is dropped
};

enum : long
{
  E_perm = 1, E_noent = 2, E_io = 5, E_nxio = 6, E_nomem = 12, E_busy = 16, E_inval = 22,
  E_range = 34, E_nosys = 38, E_badproto = 39, E_msgtooshort = 1001,
};

// ---- tiny helpers ------------------------------------------------------------

uint32_t crc_table[256];

void crc_init()
{
  for (uint32_t i = 0; i < 256; ++i)
    {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k)
        c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
      crc_table[i] = c;
    }
}

uint32_t crc32(uint8_t const *p, size_t n)
{
  uint32_t c = 0xffffffffu;
  while (n--)
    c = crc_table[(c ^ *p++) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

uint16_t get16(uint8_t const *p) { return p[0] | (p[1] << 8); }
uint32_t get32(uint8_t const *p) { return get16(p) | (uint32_t)get16(p + 2) << 16; }
uint64_t get64(uint8_t const *p) { return get32(p) | (uint64_t)get32(p + 4) << 32; }
void put16(uint8_t *p, uint16_t v) { p[0] = v; p[1] = v >> 8; }
void put32(uint8_t *p, uint32_t v) { put16(p, v); put16(p + 2, v >> 16); }
void put64(uint8_t *p, uint64_t v) { put32(p, v); put32(p + 4, v >> 32); }

// ---- objects held by handle ---------------------------------------------------

struct Obj
{
  uint8_t type;      // Cap_*
  bool owned;        // created here (deleted on release) or received (dropped)
  bool touched;      // a device the host sent requests to (reset on release)
  bool writable;     // the mapping may be written
  l4_cap_idx_t cap;
  uint8_t *addr;     // a dataspace's local mapping
  uint64_t size;
  uint64_t note;     // a device's scratch word for the host
  char name[32];
};

Obj objs[Max_handles];
unsigned ndevices;
l4_cap_idx_t rcv_slot[2];

struct Stats
{
  uint64_t frames_in, frames_out, dropped, ipc_calls, ipc_errors, events,
           triggers, bad_triggers, bytes_in, bytes_out;
} stats;

l4_uint32_t ipc_timeout_ms = 5000;
uint64_t session_role;   // 1 driver (devices used are reset at the end), 2 monitor

// ---- the UART -------------------------------------------------------------------

unsigned port = 0x2f8;
int irq_nr = 3;
unsigned divisor = 1;
bool debug;
l4_cap_idx_t uart_irq;

enum { Rbr = 0, Thr = 0, Ier = 1, Iir = 2, Fcr = 2, Lcr = 3, Mcr = 4, Lsr = 5 };
enum { Label_uart = 0x10, Label_irq_base = 0x100 };

uint8_t rx[2 * (Link_hdr + Max_payload)];
size_t rx_len;
uint8_t tx[4 * (Link_hdr + Max_payload)];
size_t tx_head, tx_tail;   // ring: bytes [tail, head) are waiting
bool thre_armed;

size_t tx_used() { return tx_head - tx_tail; }

void uart_out(unsigned reg, uint8_t v) { l4util_out8(v, port + reg); }
uint8_t uart_in(unsigned reg) { return l4util_in8(port + reg); }

void uart_set_ier()
{
  bool want = tx_used() != 0;
  uart_out(Ier, want ? 0x03 : 0x01);
  thre_armed = want;
}

// Move what the transmit FIFO takes (16 bytes when it is empty).
void uart_tx()
{
  if (!(uart_in(Lsr) & 0x20))
    return;
  for (int i = 0; i < 16 && tx_used(); ++i)
    uart_out(Thr, tx[tx_tail++ % sizeof(tx)]);
  if (!tx_used())
    tx_head = tx_tail = 0;
  if (thre_armed != (tx_used() != 0))
    uart_set_ier();
}

// Take what the receive FIFO holds while there is room; what is left stays
// in the FIFO (and the sender waits) until frames are consumed.
void uart_rx()
{
  while (rx_len < sizeof(rx) && (uart_in(Lsr) & 0x01))
    {
      rx[rx_len++] = uart_in(Rbr);
      ++stats.bytes_in;
    }
}

// Wait (polling) until the ring has room for n more bytes.
void tx_room(size_t n)
{
  while (sizeof(tx) - tx_used() < n)
    {
      uart_tx();
      if (sizeof(tx) - tx_used() < n)
        l4_ipc_sleep_us(100);
    }
}

// True when no byte arrived since the last look (and something is buffered).
size_t rx_seen;
bool uart_rx_stalled()
{
  bool stalled = stats.bytes_in == rx_seen;
  rx_seen = stats.bytes_in;
  return stalled;
}

void send_link(uint8_t const *payload, size_t n)
{
  uint8_t h[Link_hdr];
  h[0] = 0xa5; h[1] = 0x5a; h[2] = Link_type_wire; h[3] = Link_version;
  put32(h + 4, n);
  put32(h + 8, crc32(payload, n));
  put16(h + 12, crc32(h, 12) & 0xffff);
  tx_room(Link_hdr + n);
  for (size_t i = 0; i < Link_hdr; ++i)
    tx[tx_head++ % sizeof(tx)] = h[i];
  for (size_t i = 0; i < n; ++i)
    tx[tx_head++ % sizeof(tx)] = payload[i];
  stats.bytes_out += Link_hdr + n;
  ++stats.frames_out;
  uart_tx();
  if (tx_used() && !thre_armed)
    uart_set_ier();
}

bool uart_init()
{
  if (l4io_request_ioport(port, 8) < 0)
    {
      printf("l4vagent: cannot get I/O ports %#x-%#x\n", port, port + 7);
      return false;
    }
  uart_out(Ier, 0);
  uart_out(Lcr, 0x80);             // divisor latch
  uart_out(0, divisor & 0xff);
  uart_out(1, divisor >> 8);
  uart_out(Lcr, 0x03);             // 8N1
  uart_out(Fcr, 0xc7);             // FIFOs on, cleared, RX trigger at 14 bytes
  uart_out(Mcr, 0x0b);             // DTR, RTS, OUT2 (the PC's interrupt gate)
  while (uart_in(Lsr) & 0x01)
    uart_in(Rbr);
  uart_in(Iir);

  l4re_env_t *e = l4re_env();
  uart_irq = l4re_util_cap_alloc();
  long r1 = -1, r2 = -1, r3 = -1;
  if (l4_is_invalid_cap(uart_irq)
      || (r1 = l4_error(l4_factory_create_irq(e->factory, uart_irq)))
      || (r2 = l4io_request_irq(irq_nr, uart_irq)) < 0
      || (r3 = l4_error(l4_rcv_ep_bind_thread(uart_irq, e->main_thread, Label_uart))))
    {
      printf("l4vagent: cannot get IRQ %d of the UART (%ld %ld %ld)\n", irq_nr, r1, r2, r3);
      return false;
    }

  l4_irq_unmask(uart_irq);
  uart_set_ier();
  return true;
}

// ---- frames out -------------------------------------------------------------------

uint8_t out_buf[Max_payload];

struct Out
{
  unsigned nwords = 0, ncaps = 0;
  size_t ndata = 0;
  uint64_t words[Max_words];
  uint8_t caps[Max_caps][Cap_item];
  uint8_t *data = scratch_data;
  static uint8_t scratch_data[Max_payload];

  size_t room() const { return Max_payload - Frame_hdr - 8 * nwords - Cap_item * ncaps - ndata; }

  void word(uint64_t w) { if (nwords < Max_words) words[nwords++] = w; }

  void cap(uint8_t type, uint8_t rights, uint32_t handle, uint64_t size)
  {
    if (ncaps >= Max_caps)
      return;
    uint8_t *c = caps[ncaps++];
    memset(c, 0, Cap_item);
    c[0] = type; c[1] = rights;
    put32(c + 4, handle);
    put64(c + 8, size);
  }

  void send(unsigned kind, uint32_t seq, int32_t label, int32_t opcode, uint32_t flags)
  {
    size_t n = Frame_hdr + 8 * nwords + Cap_item * ncaps + ndata;
    uint8_t *p = out_buf;
    memcpy(p, "L4VW", 4);
    put16(p + 4, Wire_version);
    put16(p + 6, kind);
    put32(p + 8, n);
    put32(p + 12, seq);
    put32(p + 16, (uint32_t)label);
    put32(p + 20, (uint32_t)opcode);
    put16(p + 24, nwords);
    put16(p + 26, ncaps);
    put32(p + 28, flags);
    uint8_t *q = p + Frame_hdr;
    for (unsigned i = 0; i < nwords; ++i, q += 8)
      put64(q, words[i]);
    for (unsigned i = 0; i < ncaps; ++i, q += Cap_item)
      memcpy(q, caps[i], Cap_item);
    memcpy(q, data, ndata);
    send_link(p, n);
  }
};

uint8_t Out::scratch_data[Max_payload];
Out out;   // one frame is built at a time

void reply(uint32_t seq, int32_t result, int32_t opcode = 0, uint32_t flags = 0)
{
  out.send(K_reply, seq, result, opcode, flags);
}

void reply_error(uint32_t seq, long err, int32_t opcode = 0)
{
  out.nwords = out.ncaps = 0;
  out.ndata = 0;
  reply(seq, -err, opcode);
}

// ---- handles ----------------------------------------------------------------------

int new_handle()
{
  for (unsigned h = ndevices + 1; h < Max_handles; ++h)
    if (objs[h].type == Cap_none)
      return h;
  return -1;
}

Obj *find(uint32_t h, uint8_t type)
{
  if (h == 0 || h >= Max_handles || objs[h].type != type)
    return nullptr;
  return &objs[h];
}

void release(unsigned h)
{
  Obj &o = objs[h];
  if (o.type == Cap_none || o.type == Cap_device)
    return;
  if (o.addr)
    l4re_rm_detach(o.addr);
  if (o.owned)
    l4re_util_cap_free_um(o.cap);   // deletes the object: the device's copy goes too
  else
    {
      l4_task_release_cap(L4RE_THIS_TASK_CAP, o.cap);
      l4re_util_cap_free(o.cap);
    }
  memset(&o, 0, sizeof(o));
}

void reset_device(Obj &d)
{
  // SET_STATUS(0): opcode 0 and status 0 in the first message register.
  l4_utcb_t *u = l4_utcb();
  l4_utcb_mr_u(u)->mr[0] = 0;
  l4_timeout_s to = l4_timeout_from_us(500000);
  l4_ipc_call(d.cap, u, l4_msgtag(0, 1, 0, 0), l4_timeout(to, to));
  d.touched = false;
}

// End of a host session: every object goes, every device used is reset.
void release_session()
{
  // Reset first: a device whose queues still run must stop using our
  // memory before that memory goes.
  for (unsigned h = 1; h <= ndevices; ++h)
    if (objs[h].touched)
      reset_device(objs[h]);
  for (unsigned h = ndevices + 1; h < Max_handles; ++h)
    release(h);
}

bool attach(Obj &o, bool writable)
{
  void *a = 0;
  unsigned long sz = (o.size + L4_PAGESIZE - 1) & L4_PAGEMASK;
  if (!sz || sz > Max_alloc)
    return false;
  l4re_rm_flags_t f = L4RE_RM_F_SEARCH_ADDR | (writable ? L4RE_RM_F_RW : L4RE_RM_F_R);
  if (l4re_rm_attach(&a, sz, f, o.cap, 0, L4_PAGESHIFT) < 0)
    return false;
  o.addr = (uint8_t *)a;
  o.writable = writable;
  return true;
}

// ---- zero-run encoding of memory bytes -------------------------------------------
// Records: u16 zeros, u16 literal count, literal bytes.  Encoding 0 is raw.

size_t zr_encode(uint8_t const *s, size_t n, uint8_t *d, size_t cap)
{
  size_t i = 0, o = 0;
  while (i < n)
    {
      size_t z = 0;
      while (i + z < n && s[i + z] == 0 && z < 0xffff)
        ++z;
      size_t j = i + z, l = 0;
      while (j + l < n && l < 0xffff)
        {
          size_t k = 0;
          while (k < 8 && j + l + k < n && s[j + l + k] == 0)
            ++k;
          if (k == 8 || (k && j + l + k == n))
            break;
          l += k ? k : 1;
        }
      if (l > 0xffff)
        l = 0xffff;
      if (o + 4 + l > cap)
        return (size_t)-1;
      put16(d + o, z);
      put16(d + o + 2, l);
      memcpy(d + o + 4, s + j, l);
      o += 4 + l;
      i = j + l;
    }
  return o;
}

// Decode into d (exactly n bytes); false if the records do not add up.
bool zr_decode(uint8_t const *s, size_t sn, uint8_t *d, size_t n)
{
  size_t i = 0, o = 0;
  while (i < sn)
    {
      if (sn - i < 4)
        return false;
      size_t z = get16(s + i), l = get16(s + i + 2);
      i += 4;
      if (z > n - o || l > sn - i || l > n - o - z)
        return false;
      memset(d + o, 0, z);
      memcpy(d + o + z, s + i, l);
      o += z + l;
      i += l;
    }
  return o == n;
}

alignas(8) uint8_t expand[Max_expand];

// ---- frames in ------------------------------------------------------------------------

struct In
{
  unsigned kind, nwords, ncaps;
  uint32_t seq, flags;
  int32_t label, opcode;
  uint8_t const *words, *caps, *data;
  size_t ndata;
  uint64_t w(unsigned i) const { return get64(words + 8 * i); }
};

void do_hello(In const &f)
{
  out = Out();
  uint64_t lo = f.nwords > 0 ? f.w(0) : 0, hi = f.nwords > 1 ? f.w(1) : 0;
  uint64_t profile = f.nwords > 3 ? f.w(3) : 0;
  out.word(Wire_version);
  if (f.nwords < 4 || lo > Wire_version || hi < Wire_version || profile != Profile_remote)
    {
      out.send(K_welcome, f.seq, -E_badproto, 0, 0);
      return;
    }
  release_session();
  session_role = f.w(2);
  ipc_timeout_ms = (f.nwords > 4 && f.w(4) >= 10 && f.w(4) <= 600000) ? f.w(4) : 5000;
  out.word(f.w(2));          // role
  out.word(Max_payload);
  out.word(ndevices);
  out.word(Max_handles);
  out.word(ipc_timeout_ms);
  out.send(K_welcome, f.seq, 0, 0, 0);
}

void do_ipc(In const &f)
{
  Obj *d = find(f.flags & 0xffff, Cap_device);
  unsigned kinds = (f.flags >> 16) & 0xf;
  if (!d)
    return reply_error(f.seq, E_noent, f.opcode);
  if (f.nwords + 2 * f.ncaps > 63)
    return reply_error(f.seq, E_inval, f.opcode);
  l4_utcb_t *u = l4_utcb();
  l4_msg_regs_t *mr = l4_utcb_mr_u(u);
  for (unsigned i = 0; i < f.nwords; ++i)
    mr->mr[i] = f.w(i);
  for (unsigned i = 0; i < f.ncaps; ++i)
    {
      uint8_t const *c = f.caps + Cap_item * i;
      uint32_t h = get32(c + 4);
      if (h == 0 || h >= Max_handles || objs[h].type == Cap_none || objs[h].type == Cap_device)
        return reply_error(f.seq, E_noent, f.opcode);
      mr->mr[f.nwords + 2 * i] = l4_map_obj_control(0, L4_MAP_ITEM_MAP);
      mr->mr[f.nwords + 2 * i + 1] = l4_obj_fpage(objs[h].cap, 0, (c[1] & L4_CAP_FPAGE_RWS) | L4_CAP_FPAGE_R).raw;
    }
  l4_buf_regs_t *br = l4_utcb_br_u(u);
  br->bdr = 0;
  for (unsigned s = 0; s < 2; ++s)
    {
      if (l4_is_invalid_cap(rcv_slot[s]))
        rcv_slot[s] = l4re_util_cap_alloc();
      br->br[s] = rcv_slot[s] | L4_RCV_ITEM_SINGLE_CAP;
    }
  br->br[2] = 0;
  if (session_role == 1)
    d->touched = true;
  ++stats.ipc_calls;
  // Both phases are bounded: a server whose thread hangs (or died with its
  // task still around) must not take the agent with it.
  l4_timeout_s to = l4_timeout_from_us(ipc_timeout_ms * 1000);
  l4_msgtag_t t = l4_ipc_call(d->cap, u, l4_msgtag(f.label, f.nwords, f.ncaps, 0),
                              l4_timeout(to, to));
  out = Out();
  long ipc_err = l4_ipc_error(t, u);
  if (ipc_err)
    {
      ++stats.ipc_errors;
      return reply(f.seq, -E_io, f.opcode, ipc_err);
    }
  unsigned words = l4_msgtag_words(t), items = l4_msgtag_items(t);
  for (unsigned i = 0; i < words && i < Max_words; ++i)
    out.word(mr->mr[i]);
  for (unsigned s = 0; s < items && s < 2; ++s)
    {
      unsigned kind = (kinds >> (2 * s)) & 3;
      if (l4_msgtag_label(l4_task_cap_valid(L4RE_THIS_TASK_CAP, rcv_slot[s])) <= 0)
        {
          out.cap(Cap_none, 0, 0, 0);
          continue;
        }
      int h = new_handle();
      if (h < 0)
        {
          l4_task_release_cap(L4RE_THIS_TASK_CAP, rcv_slot[s]);
          out.cap(Cap_none, 0, 0, 0);
          continue;
        }
      Obj &o = objs[h];
      memset(&o, 0, sizeof(o));
      o.cap = rcv_slot[s];
      rcv_slot[s] = L4_INVALID_CAP;
      o.type = kind == Cap_ds ? Cap_ds : Cap_irq;
      if (o.type == Cap_ds)
        {
          // Memory a device owns is copied through the memory server; the
          // mapping is only the way in for dataspaces of other servers.
          long sz = l4re_ds_size(o.cap);
          o.size = sz > 0 ? sz : 0;
          if (!attach(o, true))
            attach(o, false);
        }
      out.cap(o.type, 0, h, o.size);
    }
  reply(f.seq, l4_msgtag_label(t), f.opcode);
}

bool check_ranges(In const &f, Obj const &o, unsigned first, size_t *total)
{
  *total = 0;
  if ((f.nwords - first) % 2)
    return false;
  for (unsigned i = first; i < f.nwords; i += 2)
    {
      uint64_t off = f.w(i), len = f.w(i + 1);
      if (off > o.size || len > o.size - off)
        return false;
      *total += len;
      if (*total > Max_expand)
        return false;
    }
  return true;
}

// A dataspace someone else owns dies with its owner (a device server that
// crashed): its pages vanish from our mapping, and touching them would end
// the agent.  Such memory is copied through a scratch dataspace of our own
// by the memory server (an IPC that fails cleanly when the owner is gone);
// only memory of another kind is touched directly, and only while its
// capability is valid.
l4_cap_idx_t scratch_cap = L4_INVALID_CAP;
uint8_t *scratch;

bool gone(Obj const &o)
{
  return !o.owned && l4_msgtag_label(l4_task_cap_valid(L4RE_THIS_TASK_CAP, o.cap)) <= 0;
}

// Copy in the widest unit that address and length allow: a 16-bit ring
// index or a 32-bit word is never torn for a device that reads it while we
// write it (or writes it while we read it).
void copy_units(uint8_t *dst, uint8_t const *src, size_t len)
{
  uintptr_t a = (uintptr_t)dst | (uintptr_t)src | len;
  if (!(a & 7))
    for (size_t i = 0; i < len; i += 8)
      *(uint64_t volatile *)(dst + i) = *(uint64_t const volatile *)(src + i);
  else if (!(a & 3))
    for (size_t i = 0; i < len; i += 4)
      *(uint32_t volatile *)(dst + i) = *(uint32_t const volatile *)(src + i);
  else if (!(a & 1))
    for (size_t i = 0; i < len; i += 2)
      *(uint16_t volatile *)(dst + i) = *(uint16_t const volatile *)(src + i);
  else
    for (size_t i = 0; i < len; ++i)
      dst[i] = src[i];
}

// Copy len bytes at off of o to dst: 0, or E_nxio if o's owner is gone,
// E_nomem if o can be reached neither way.
long copy_out(Obj const &o, uint64_t off, uint8_t *dst, size_t len)
{
  if (!o.owned && scratch && l4re_ds_copy_in(scratch_cap, 0, o.cap, off, len) == 0)
    {
      memcpy(dst, scratch, len);
      return 0;
    }
  if (gone(o))
    return E_nxio;
  if (!o.addr)
    return E_nomem;
  copy_units(dst, o.addr + off, len);   // ours, or not the memory server's dataspace: direct
  return 0;
}

long copy_in(Obj const &o, uint64_t off, uint8_t const *src, size_t len)
{
  if (!o.owned && scratch)
    {
      memcpy(scratch, src, len);
      if (l4re_ds_copy_in(o.cap, off, scratch_cap, 0, len) == 0)
        return 0;
    }
  if (gone(o))
    return E_nxio;
  if (!o.addr)
    return E_nomem;
  if (!o.writable)
    return E_perm;
  copy_units(o.addr + off, src, len);
  return 0;
}

void scratch_init()
{
  void *a = 0;
  scratch_cap = l4re_util_cap_alloc();
  if (l4_is_invalid_cap(scratch_cap) || l4re_ma_alloc(Max_expand, scratch_cap, 0) < 0
      || l4re_rm_attach(&a, Max_expand, L4RE_RM_F_SEARCH_ADDR | L4RE_RM_F_RW, scratch_cap, 0,
                        L4_PAGESHIFT) < 0)
    {
      printf("l4vagent: no scratch memory: device memory is copied directly\n");
      return;
    }
  scratch = (uint8_t *)a;
}

// The dataspace and the ranges a READ or WRITE names (words 1..: offset,
// length); nullptr after answering the error when they do not hold.
Obj *ranges_of(In const &f, size_t *total)
{
  Obj *o = find(f.flags, Cap_ds);
  out = Out();
  long err = 0;
  if (!o || f.nwords < 1)
    err = E_noent;
  else if (!o->addr && o->owned)
    err = E_nomem;
  else if (!check_ranges(f, *o, 1, total))
    err = E_range;
  if (err)
    {
      reply_error(f.seq, err);
      return nullptr;
    }
  return o;
}

void do_read(In const &f)
{
  size_t total;
  Obj *o = ranges_of(f, &total);
  if (!o)
    return;
  size_t at = 0;
  for (unsigned i = 1; i < f.nwords; i += 2)
    {
      if (long e = copy_out(*o, f.w(i), expand + at, f.w(i + 1)))
        return reply_error(f.seq, e);
      at += f.w(i + 1);
    }
  size_t room = Max_payload - Frame_hdr - 8;
  size_t n = (f.w(0) & 2) ? zr_encode(expand, total, out.data, room) : (size_t)-1;
  if (n != (size_t)-1 && n < total)
    {
      out.word(1);
      out.ndata = n;
    }
  else if (total <= room)
    {
      out.word(0);
      memcpy(out.data, expand, total);
      out.ndata = total;
    }
  else
    return reply_error(f.seq, E_range);
  reply(f.seq, 0);
}

void do_write(In const &f)
{
  size_t total;
  Obj *o = ranges_of(f, &total);
  if (!o)
    return;
  if (f.w(0) == 1)
    {
      if (!zr_decode(f.data, f.ndata, expand, total))
        return reply_error(f.seq, E_inval);
    }
  else if (f.w(0) == 0 && f.ndata == total)
    memcpy(expand, f.data, total);
  else
    return reply_error(f.seq, E_inval);
  size_t at = 0;
  for (unsigned i = 1; i < f.nwords; i += 2)
    {
      if (long e = copy_in(*o, f.w(i), expand + at, f.w(i + 1)))
        return reply_error(f.seq, e);
      at += f.w(i + 1);
    }
  reply(f.seq, 0);
}

void do_trigger(In const &f)
{
  Obj *o = find(f.flags, Cap_irq);
  if (!o || l4_error(l4_irq_trigger(o->cap)))
    ++stats.bad_triggers;
  else
    ++stats.triggers;
}

void do_agent(In const &f)
{
  out = Out();
  l4re_env_t *e = l4re_env();
  switch (f.opcode)
    {
    case Op_list:
      for (unsigned h = 1; h <= ndevices; ++h)
        {
          size_t l = strlen(objs[h].name);
          out.word(h);
          memcpy(out.data + out.ndata, objs[h].name, l);
          out.data[out.ndata + l] = '\n';
          out.ndata += l + 1;
        }
      return reply(f.seq, 0, f.opcode);
    case Op_alloc_ds:
      {
        if (f.nwords < 2 || f.w(0) == 0 || f.w(0) > Max_alloc)
          return reply_error(f.seq, E_inval, f.opcode);
        int h = new_handle();
        if (h < 0)
          return reply_error(f.seq, E_nomem, f.opcode);
        Obj &o = objs[h];
        memset(&o, 0, sizeof(o));
        o.cap = l4re_util_cap_alloc();
        o.size = (f.w(0) + L4_PAGESIZE - 1) & L4_PAGEMASK;
        unsigned long flags = (f.w(1) & 1) ? L4RE_MA_CONTINUOUS | L4RE_MA_PINNED : 0;
        if (l4_is_invalid_cap(o.cap) || l4re_ma_alloc(o.size, o.cap, flags) < 0)
          {
            if (!l4_is_invalid_cap(o.cap))
              l4re_util_cap_free(o.cap);
            memset(&o, 0, sizeof(o));
            return reply_error(f.seq, E_nomem, f.opcode);
          }
        o.type = Cap_ds;
        o.owned = true;
        if (!attach(o, true))
          {
            release(h);
            return reply_error(f.seq, E_nomem, f.opcode);
          }
        memset(o.addr, 0, o.size);
        out.cap(Cap_ds, 0x5, h, o.size);
        return reply(f.seq, 0, f.opcode);
      }
    case Op_irq_create:
      {
        int h = new_handle();
        if (h < 0)
          return reply_error(f.seq, E_nomem, f.opcode);
        Obj &o = objs[h];
        memset(&o, 0, sizeof(o));
        o.cap = l4re_util_cap_alloc();
        if (l4_is_invalid_cap(o.cap)
            || l4_error(l4_factory_create_irq(e->factory, o.cap))
            || l4_error(l4_rcv_ep_bind_thread(o.cap, e->main_thread, Label_irq_base + (h << 4))))
          {
            if (!l4_is_invalid_cap(o.cap))
              l4re_util_cap_free_um(o.cap);
            memset(&o, 0, sizeof(o));
            return reply_error(f.seq, E_nomem, f.opcode);
          }
        o.type = Cap_irq;
        o.owned = true;
        out.cap(Cap_irq, 0x1, h, 0);
        return reply(f.seq, 0, f.opcode);
      }
    case Op_release:
      for (unsigned i = 0; i < f.nwords; ++i)
        if (f.w(i) > ndevices && f.w(i) < Max_handles)
          release(f.w(i));
      return reply(f.seq, 0, f.opcode);
    case Op_stats:
      {
        unsigned used = 0;
        for (unsigned h = ndevices + 1; h < Max_handles; ++h)
          used += objs[h].type != Cap_none;
        uint64_t const v[] = { stats.frames_in, stats.frames_out, stats.dropped,
                               stats.ipc_calls, stats.ipc_errors, stats.events,
                               stats.triggers, stats.bad_triggers, stats.bytes_in,
                               stats.bytes_out, used };
        for (uint64_t x : v)
          out.word(x);
        return reply(f.seq, 0, f.opcode);
      }
    case Op_echo:
      memcpy(out.data, f.data, f.ndata);
      out.ndata = f.ndata;
      return reply(f.seq, 0, f.opcode);
    case Op_reset:
      release_session();
      return reply(f.seq, 0, f.opcode);
    case Op_note:
      {
        Obj *d = f.nwords && f.w(0) < Max_handles ? find(f.w(0), Cap_device) : nullptr;
        if (!d)
          return reply_error(f.seq, E_noent, f.opcode);
        if (f.nwords > 1)
          d->note = f.w(1);
        out.word(d->note);
        return reply(f.seq, 0, f.opcode);
      }
    default:
      return reply_error(f.seq, E_nosys, f.opcode);
    }
}

void dispatch(uint8_t const *p, size_t n)
{
  ++stats.frames_in;
  if (n < Frame_hdr || memcmp(p, "L4VW", 4) || get32(p + 8) != n)
    return;   // not a frame of ours: nothing can be answered
  In f;
  f.kind = get16(p + 6);
  f.seq = get32(p + 12);
  f.label = (int32_t)get32(p + 16);
  f.opcode = (int32_t)get32(p + 20);
  f.nwords = get16(p + 24);
  f.ncaps = get16(p + 26);
  f.flags = get32(p + 28);
  size_t need = Frame_hdr + 8 * (size_t)f.nwords + Cap_item * (size_t)f.ncaps;
  if (get16(p + 4) != Wire_version && f.kind != K_hello)
    return reply_error(f.seq, E_badproto);
  if (f.nwords > Max_words || f.ncaps > Max_caps || need > n)
    return reply_error(f.seq, E_msgtooshort);
  f.words = p + Frame_hdr;
  f.caps = f.words + 8 * f.nwords;
  f.data = f.caps + Cap_item * f.ncaps;
  f.ndata = n - need;
  switch (f.kind)
    {
    case K_hello: return do_hello(f);
    case K_request:
      if (f.label == (int32_t)Label_agent && (f.flags & 0xffff) == 0)
        return do_agent(f);
      return do_ipc(f);
    case K_read: return do_read(f);
    case K_write: return do_write(f);
    case K_trigger: return do_trigger(f);
    case K_bye:
      release_session();
      out = Out();
      return reply(f.seq, 0);
    default:
      return reply_error(f.seq, E_badproto);
    }
}

// Take every whole link frame out of the receive buffer; skip noise.
void parse_rx()
{
  size_t i = 0;
  for (;;)
    {
      while (i + 1 < rx_len && !(rx[i] == 0xa5 && rx[i + 1] == 0x5a))
        ++i;
      if (i + Link_hdr > rx_len)
        break;
      uint8_t const *h = rx + i;
      uint32_t len = get32(h + 4);
      if (get16(h + 12) != (crc32(h, 12) & 0xffff) || len > Max_payload)
        {
          ++i;   // a marker in the noise
          continue;
        }
      if (i + Link_hdr + len > rx_len)
        break;   // wait for the rest
      if (crc32(h + Link_hdr, len) != get32(h + 8))
        {
          ++stats.dropped;   // damaged: look for the next marker inside it
          ++i;
          continue;
        }
      if (h[3] == Link_version && h[2] == Link_type_wire)
        dispatch(h + Link_hdr, len);
      else
        ++stats.dropped;     // intact, of another version or type: skipped whole
      i += Link_hdr + len;
    }
  if (i)
    {
      memmove(rx, rx + i, rx_len - i);
      rx_len -= i;
    }
}

void irq_event(unsigned h)
{
  ++stats.events;
  out = Out();
  out.word(1);
  out.send(K_event, 0, 0, 0, h);
  l4_irq_unmask(objs[h].cap);
}

int add_device(char const *name)
{
  l4_cap_idx_t c = l4re_env_get_cap(name);
  if (l4_is_invalid_cap(c))
    {
      printf("l4vagent: no capability named '%s'\n", name);
      return -1;
    }
  if (ndevices >= Max_devices)
    {
      printf("l4vagent: more than %u devices: '%s' left out\n", (unsigned)Max_devices, name);
      return -1;
    }
  if (strlen(name) >= sizeof(objs[0].name))
    {
      printf("l4vagent: device name '%s' is longer than %zu bytes: left out\n", name,
             sizeof(objs[0].name) - 1);
      return -1;
    }
  Obj &o = objs[++ndevices];
  o.type = Cap_device;
  o.cap = c;
  snprintf(o.name, sizeof(o.name), "%s", name);
  return 0;
}

} // namespace

int main(int argc, char **argv)
{
  crc_init();
  rcv_slot[0] = rcv_slot[1] = L4_INVALID_CAP;
  for (int i = 1; i < argc; ++i)
    {
      if (!strcmp(argv[i], "-p") && i + 1 < argc)
        port = strtoul(argv[++i], 0, 0);
      else if (!strcmp(argv[i], "-i") && i + 1 < argc)
        irq_nr = strtol(argv[++i], 0, 0);
      else if (!strcmp(argv[i], "-d"))
        debug = true;
      else if (!strcmp(argv[i], "-b") && i + 1 < argc)
        divisor = strtoul(argv[++i], 0, 0);
      else
        add_device(argv[i]);
    }
  if (!divisor || divisor > 0xffff)
    divisor = 1;
  scratch_init();
  if (!uart_init())
    return 1;
  printf("l4vagent: ready on %#x IRQ %d, %u device(s)\n", port, irq_nr, ndevices);
  fflush(stdout);

  l4_utcb_t *u = l4_utcb();
  for (;;)
    {
      l4_umword_t label;
      // Bytes of an unfinished frame wait at most Idle_ms for the rest: a host
      // that died mid-frame must not make the agent swallow the next host's
      // frames as the missing payload.
      l4_msgtag_t t = l4_ipc_wait(u, &label, rx_len ? l4_timeout(L4_IPC_TIMEOUT_NEVER, l4_timeout_from_us(Idle_ms * 1000))
                                                   : L4_IPC_NEVER);
      if (l4_ipc_error(t, u))
        {
          if (l4_ipc_error(t, u) == L4_IPC_RETIMEOUT && rx_len)
            {
              uart_rx();
              if (!uart_rx_stalled())
                continue;
              ++stats.dropped;
              memmove(rx, rx + 1, --rx_len);   // give up on that marker; resynchronise after it
              parse_rx();
            }
          continue;
        }
      if (debug)
        printf("l4vagent: wake %lx, %zu bytes buffered\n", (unsigned long)label, rx_len);
      if (label == Label_uart)
        {
          // The line is edge triggered: serve the UART until it has nothing
          // pending (its interrupt output drops), so the next event is an edge.
          l4_irq_unmask(uart_irq);
          for (int rounds = 0; rounds < 1000; ++rounds)
            {
              uart_rx();
              uart_tx();
              parse_rx();
              if (uart_in(Iir) & 1)
                break;
            }
        }
      else if (label >= Label_irq_base)
        {
          unsigned h = (label - Label_irq_base) >> 4;
          if (h < Max_handles && objs[h].type == Cap_irq)
            irq_event(h);
        }
    }
}
