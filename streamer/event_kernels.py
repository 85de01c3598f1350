"""The common shape of an interaction record, recognised for a whole batch in one kernel call.

Nearly every record on the interactions topic looks alike: a flat JSON object of short
ASCII strings and plain numbers, ``{"user": "u1", "item": "i9", "ts": 1700000000.5,
"weight": 2.0, "event_id": "c0ffee"}``. :func:`scan_interactions` reads a batch's values
(joined in one buffer) and, for each record it can vouch for, returns where its user,
item and event id lie and its time and weight as numbers, so the decoder builds the
:class:`streamer.events.Interaction` without a JSON parse or a dict per record.

It vouches only where :meth:`streamer.events.EventDecoder.decode` (the reference the
tests hold it to) would accept the record, and with the same fields:

- the value is one JSON object, standard whitespace only, all bytes ASCII (so valid
  UTF-8 and no escapes to undo: a backslash anywhere sends the record to the decoder);
- ``user`` and ``item`` are strings of 1..``max_id`` bytes, ``user`` equal to the key;
- ``ts`` is a number; ``weight`` a number >= 0 or absent (the default weight);
  ``event_id`` a non-empty string or absent; none of these appears twice, and there is
  no ``event`` field (a name to map to a weight);
- other fields hold strings, numbers, ``true``, ``false`` or ``null`` (not objects or
  arrays, which the decoder may take);
- numbers are JSON numbers. The kernel converts those it can convert exactly the simple
  way (Clinger's fast path): at most 19 significant digits forming an integer m < 2^53 and
  a decimal exponent e with |e| <= 22, so that ``m * 10^e`` (or ``m / 10^-e``) in one IEEE
  operation is the correctly rounded value; a JSON integer is the float of its value (as
  ``float(int)``, so ``-0`` is 0.0). Others (17-digit times, say) it hands back as text for
  ``float()``, which rounds correctly too.

Anything else gets status 0 and goes through the decoder, which decides (and rejects
with the reason it always gave).
"""

from __future__ import annotations

import numba as nb
import numpy as np

__all__ = ["event_id_hashes", "scan_interactions"]

_QUOTE, _BACKSLASH, _COLON, _COMMA = 0x22, 0x5C, 0x3A, 0x2C
_LBRACE, _RBRACE = 0x7B, 0x7D

_POW10 = np.array([10.0 ** i for i in range(23)])

# Field names, as the kernel compares them, and their numbers (_OTHER: any other name).
# Columns of ``ints`` (position, length): user 0-1, item 2-3, event id 4-5, the time's
# text 6-7, the weight's text 8-9.
_NAMES = [b"user", b"item", b"ts", b"weight", b"event_id", b"event"]
_USER, _ITEM, _TS, _WEIGHT, _EVENT_ID, _EVENT, _OTHER = range(7)


@nb.njit(cache=True, nogil=True, inline="always")
def _is_ws(c):
    return c == 0x20 or c == 0x0A or c == 0x0D or c == 0x09


@nb.njit(cache=True, nogil=True)
def _skip_ws(buf, p, end):
    while p < end and _is_ws(buf[p]):
        p += 1
    return p


@nb.njit(cache=True, nogil=True)
def _string_end(buf, p, end):
    """``p`` is just past an opening quote: the position of the closing quote, or -1 when
    the string holds a backslash, a control character, a non-ASCII byte or never ends."""
    while p < end:
        c = buf[p]
        if c == _QUOTE:
            return p
        if c == _BACKSLASH or c < 0x20 or c >= 0x80:
            return -1
        p += 1
    return -1


@nb.njit(cache=True, nogil=True)
def _number(buf, p, end, pow10):
    """JSON number at ``p`` -> (next position or -1 when it is not a JSON number, value,
    exact). ``exact`` False: the fast path cannot give the correctly rounded value (see
    module doc) and ``value`` is meaningless; the caller converts the text instead."""
    neg = False
    if p < end and buf[p] == 0x2D:  # '-'
        neg = True
        p += 1
    if p >= end or not (0x30 <= buf[p] <= 0x39):
        return -1, 0.0, False
    m = np.uint64(0)
    digits = 0  # significant digits
    exact = True
    exp10 = 0
    is_float = False
    if buf[p] == 0x30:
        p += 1
        if p < end and 0x30 <= buf[p] <= 0x39:
            return -1, 0.0, False  # a leading zero: not JSON
    else:
        while p < end and 0x30 <= buf[p] <= 0x39:
            if digits < 19:
                m = m * np.uint64(10) + np.uint64(buf[p] - 0x30)
            else:
                exact = False
            digits += 1
            p += 1
    if p < end and buf[p] == 0x2E:  # '.'
        is_float = True
        p += 1
        if p >= end or not (0x30 <= buf[p] <= 0x39):
            return -1, 0.0, False
        while p < end and 0x30 <= buf[p] <= 0x39:
            d = buf[p] - 0x30
            if digits > 0 or d != 0:
                if digits < 19:
                    m = m * np.uint64(10) + np.uint64(d)
                    exp10 -= 1
                else:
                    exact = False
                digits += 1
            else:
                exp10 -= 1
            p += 1
    if p < end and (buf[p] == 0x65 or buf[p] == 0x45):  # 'e' / 'E'
        is_float = True
        p += 1
        eneg = False
        if p < end and (buf[p] == 0x2B or buf[p] == 0x2D):
            eneg = buf[p] == 0x2D
            p += 1
        if p >= end or not (0x30 <= buf[p] <= 0x39):
            return -1, 0.0, False
        e = 0
        while p < end and 0x30 <= buf[p] <= 0x39:
            if e < 100000:
                e = e * 10 + (buf[p] - 0x30)
            p += 1
        exp10 += -e if eneg else e
    if m == 0 and exact:
        value = 0.0
    elif not exact or m >= np.uint64(1) << np.uint64(53) or exp10 < -22 or exp10 > 22:
        return p, 0.0, False
    elif exp10 >= 0:
        value = np.float64(m) * pow10[exp10]
    else:
        value = np.float64(m) / pow10[-exp10]
    if neg and (is_float or value != 0.0):
        value = -value  # "-0" is the integer 0; "-0.0" the float -0.0
    return p, value, True


@nb.njit(cache=True, nogil=True)
def _field(buf, p, q, names, name_ptr):
    """Which of the known names ``buf[p:q]`` is (``_OTHER`` when none)."""
    n = q - p
    for f in range(name_ptr.shape[0] - 1):
        lo, hi = name_ptr[f], name_ptr[f + 1]
        if hi - lo == n:
            same = True
            for i in range(n):
                if buf[p + i] != names[lo + i]:
                    same = False
                    break
            if same:
                return f
    return _OTHER


@nb.njit(cache=True, nogil=True)
def _scan_one(buf, p, end, keys, kp, kl, max_id, default_weight, names, name_ptr, pow10, out_f, out_i):
    """One value ``buf[p:end]``; fills ``out_i`` (user, item, event id, ts text, weight
    text: position and length each) and ``out_f`` (ts, weight). Returns True when the
    record is vouched for (numbers whose text length is > 0 still to convert)."""
    seen = 0  # bit f: field f was seen
    out_i[4] = -1
    out_i[5] = -1
    out_i[7] = 0
    out_i[9] = 0
    out_f[1] = default_weight
    p = _skip_ws(buf, p, end)
    if p >= end or buf[p] != _LBRACE:
        return False
    p = _skip_ws(buf, p + 1, end)
    if p < end and buf[p] == _RBRACE:
        return False  # {}: no user
    while True:
        if p >= end or buf[p] != _QUOTE:
            return False
        q = _string_end(buf, p + 1, end)
        if q < 0:
            return False
        f = _field(buf, p + 1, q, names, name_ptr)
        if f != _OTHER:
            if (seen >> f) & 1 or f == _EVENT:  # a repeated field, or an event name
                return False
            seen |= 1 << f
        p = _skip_ws(buf, q + 1, end)
        if p >= end or buf[p] != _COLON:
            return False
        p = _skip_ws(buf, p + 1, end)
        if p >= end:
            return False
        c = buf[p]
        if c == _QUOTE:
            q = _string_end(buf, p + 1, end)
            if q < 0:
                return False
            n = q - p - 1
            if f == _USER or f == _ITEM:
                if n < 1 or n > max_id:
                    return False
                out_i[2 * f] = p + 1
                out_i[2 * f + 1] = n
            elif f == _EVENT_ID:
                if n < 1:
                    return False
                out_i[4] = p + 1
                out_i[5] = n
            elif f == _TS or f == _WEIGHT:
                return False  # a string time (ISO-8601) or weight: the decoder's
            p = q + 1
        elif c == 0x2D or (0x30 <= c <= 0x39):
            start = p
            p, value, exact = _number(buf, p, end, pow10)
            if p < 0:
                return False
            if f == _TS or f == _WEIGHT:
                if exact:
                    if f == _WEIGHT and not value >= 0.0:
                        return False
                    out_f[f - _TS] = value
                else:  # the caller converts the text
                    out_i[2 * f + 2] = start
                    out_i[2 * f + 3] = p - start
            elif f != _OTHER:
                return False  # user, item or event_id not a string
        elif f == _OTHER and c == 0x74 and p + 4 <= end and buf[p + 1] == 0x72 and buf[p + 2] == 0x75 \
                and buf[p + 3] == 0x65:  # true
            p += 4
        elif f == _OTHER and c == 0x66 and p + 5 <= end and buf[p + 1] == 0x61 and buf[p + 2] == 0x6C \
                and buf[p + 3] == 0x73 and buf[p + 4] == 0x65:  # false
            p += 5
        elif f == _OTHER and c == 0x6E and p + 4 <= end and buf[p + 1] == 0x75 and buf[p + 2] == 0x6C \
                and buf[p + 3] == 0x6C:  # null
            p += 4
        else:
            return False
        p = _skip_ws(buf, p, end)
        if p >= end:
            return False
        if buf[p] == _COMMA:
            p = _skip_ws(buf, p + 1, end)
            continue
        if buf[p] != _RBRACE:
            return False
        p = _skip_ws(buf, p + 1, end)
        break
    required = (1 << _USER) | (1 << _ITEM) | (1 << _TS)
    if p != end or seen & required != required:
        return False
    # The user must be the key.
    if out_i[1] != kl:
        return False
    up = out_i[0]
    for i in range(kl):
        if buf[up + i] != keys[kp + i]:
            return False
    return True


@nb.njit(cache=True, nogil=True)
def _scan(buf, v_ptr, v_null, keys, k_ptr, k_null, max_id, default_weight, names, name_ptr, pow10,
          status, ints, floats):
    for r in range(v_ptr.shape[0] - 1):
        status[r] = 0
        if v_null[r] or k_null[r]:
            continue
        if _scan_one(buf, v_ptr[r], v_ptr[r + 1], keys, k_ptr[r], k_ptr[r + 1] - k_ptr[r], max_id,
                     default_weight, names, name_ptr, pow10, floats[r], ints[r]):
            status[r] = 1


# BLAKE2b (RFC 7693) with an 8-byte digest and no key: the event id hash of
# :func:`streamer.codec.event_id_hash` (hashlib there, the reference the tests hold this to).
_B2_IV = np.array([0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
                   0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179],
                  dtype=np.uint64)
_B2_SIGMA = np.array([
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
    [11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4],
    [7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8],
    [9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13],
    [2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9],
    [12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11],
    [13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10],
    [6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5],
    [10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0],
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3]], dtype=np.int64)


@nb.njit(cache=True, nogil=True, inline="always")
def _rotr(x, n):
    return (x >> np.uint64(n)) | (x << np.uint64(64 - n))


@nb.njit(cache=True, nogil=True, inline="always")
def _g(a, b, c, d, x, y):
    a = a + b + x
    d = _rotr(d ^ a, 32)
    c = c + d
    b = _rotr(b ^ c, 24)
    a = a + b + y
    d = _rotr(d ^ a, 16)
    c = c + d
    b = _rotr(b ^ c, 63)
    return a, b, c, d


@nb.njit(cache=True, nogil=True)
def blake2b_8(buf, pos, length, iv, sigma, m):
    """BLAKE2b-64 (8-byte digest, no key) of ``buf[pos:pos + length]`` as the little-endian
    uint64 of its digest (``int.from_bytes(digest, "little")``). ``m``: uint64[16] scratch."""
    h0, h1, h2, h3 = iv[0] ^ np.uint64(0x01010008), iv[1], iv[2], iv[3]  # digest 8, no key
    h4, h5, h6, h7 = iv[4], iv[5], iv[6], iv[7]
    done = 0
    while True:
        n = min(128, length - done)
        for w in range(16):
            m[w] = 0
        for i in range(n):
            m[i >> 3] |= np.uint64(buf[pos + done + i]) << np.uint64(8 * (i & 7))
        done += n
        v0, v1, v2, v3, v4, v5, v6, v7 = h0, h1, h2, h3, h4, h5, h6, h7
        v8, v9, v10, v11, v12, v13, v14, v15 = iv[0], iv[1], iv[2], iv[3], iv[4], iv[5], iv[6], iv[7]
        v12 ^= np.uint64(done)
        if done >= length:
            v14 = ~v14  # the last block
        for r in range(12):
            s = sigma[r]
            v0, v4, v8, v12 = _g(v0, v4, v8, v12, m[s[0]], m[s[1]])
            v1, v5, v9, v13 = _g(v1, v5, v9, v13, m[s[2]], m[s[3]])
            v2, v6, v10, v14 = _g(v2, v6, v10, v14, m[s[4]], m[s[5]])
            v3, v7, v11, v15 = _g(v3, v7, v11, v15, m[s[6]], m[s[7]])
            v0, v5, v10, v15 = _g(v0, v5, v10, v15, m[s[8]], m[s[9]])
            v1, v6, v11, v12 = _g(v1, v6, v11, v12, m[s[10]], m[s[11]])
            v2, v7, v8, v13 = _g(v2, v7, v8, v13, m[s[12]], m[s[13]])
            v3, v4, v9, v14 = _g(v3, v4, v9, v14, m[s[14]], m[s[15]])
        h0 ^= v0 ^ v8
        h1 ^= v1 ^ v9
        h2 ^= v2 ^ v10
        h3 ^= v3 ^ v11
        h4 ^= v4 ^ v12
        h5 ^= v5 ^ v13
        h6 ^= v6 ^ v14
        h7 ^= v7 ^ v15
        if done >= length:
            return h0


def event_id_hashes(buf: bytes, pos, length) -> np.ndarray:
    """:func:`streamer.codec.event_id_hash` of the non-empty ids ``buf[pos[i]:pos[i] + length[i]]``
    (bytes, as UTF-8), uint64."""
    out = np.empty(len(pos), np.uint64)
    _hash_ids(np.frombuffer(buf, np.uint8), np.asarray(pos, np.int64), np.asarray(length, np.int64),
              _B2_IV, _B2_SIGMA, out)
    return out


@nb.njit(cache=True, nogil=True)
def _hash_ids(buf, pos, length, iv, sigma, out):
    m = np.empty(16, np.uint64)
    for i in range(pos.shape[0]):
        value = blake2b_8(buf, pos[i], length[i], iv, sigma, m)
        out[i] = value if value != 0 else np.uint64(1)


_NAME_BUF = np.frombuffer(b"".join(_NAMES), dtype=np.uint8)
_NAME_PTR = np.cumsum([0] + [len(n) for n in _NAMES]).astype(np.int64)


def _joined(parts: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, bytes]:
    """``parts`` (bytes or None) joined: (uint8 buffer, int64 ptr, bool null, joined bytes)."""
    lengths = np.array([-1 if p is None else len(p) for p in parts], dtype=np.int64)
    null = lengths < 0
    ptr = np.zeros(len(parts) + 1, np.int64)
    np.cumsum(np.maximum(lengths, 0), out=ptr[1:])
    joined = b"".join([p for p in parts if p is not None] if null.any() else parts)
    return np.frombuffer(joined, dtype=np.uint8), ptr, null, joined


def scan_interactions(keys: list, values: list, max_id: int, default_weight: float):
    """Recognise the common interaction shape in every record of a batch (see module doc).

    Parameters
    ----------
    keys, values : lists of bytes or None, one per record.
    max_id : longest user or item id, in bytes.
    default_weight : the weight of a record without one.

    Returns
    -------
    (status, ints, floats, values_joined) : ``status[r]`` 1 where record ``r`` is an
    interaction of the common shape; for those, ``ints[r]`` holds the position and
    length in ``values_joined`` of the user, the item, the event id (length -1: none),
    the time's text and the weight's text, and ``floats[r]`` the time and the weight.
    A number's text length is 0 where the kernel converted it exactly; otherwise the
    caller converts the text (``float(text)``: it is a JSON number) and checks it (finite;
    weight >= 0), and decodes the record the slow way if that fails.
    """
    n = len(values)
    buf, v_ptr, v_null, joined = _joined(values)
    kbuf, k_ptr, k_null, _ = _joined(keys)
    status = np.zeros(n, np.int8)
    ints = np.zeros((n, 10), np.int64)
    floats = np.zeros((n, 2), np.float64)
    if n:
        _scan(buf, v_ptr, v_null, kbuf, k_ptr, k_null, int(max_id), float(default_weight),
              _NAME_BUF, _NAME_PTR, _POW10, status, ints, floats)
    return status, ints, floats, joined
