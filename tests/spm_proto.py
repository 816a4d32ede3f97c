"""A minimal reader/writer of SentencePiece ModelProto bytes (protobuf wire format), for tests:
inspect what a tokenizer.model sets and craft malformed or unusual vocabularies without the
`protobuf` package (which is not a dependency). Written from sentencepiece_model.proto:

  ModelProto:     1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec, 5 denormalizer_spec
  SentencePiece:  1 piece (string), 2 score (float), 3 type (enum: 1 NORMAL, 2 UNKNOWN,
                  3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE)
  TrainerSpec:    3 model_type (1 UNIGRAM, 2 BPE), 24 treat_whitespace_as_suffix, 35 byte_fallback,
                  40-43 unk/bos/eos/pad id, 44 unk_surface, 45-48 unk/bos/eos/pad piece, ...
  NormalizerSpec: 1 name, 2 precompiled_charsmap, 3 add_dummy_prefix,
                  4 remove_extra_whitespaces, 5 escape_whitespaces
"""
from __future__ import annotations

import struct

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _varint(buf: bytes, pos: int):
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def fields(buf: bytes):
    """[(field_number, wire_type, value)] in order; value is an int, or bytes for wire type 2."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, pos = _varint(buf, pos)
        elif wt == 1:
            v, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            v, pos = bytes(buf[pos:pos + n]), pos + n
        elif wt == 5:
            v, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise ValueError(f"wire type {wt} not supported")
        out.append((num, wt, v))
    return out


def _enc_varint(v: int) -> bytes:
    if v < 0:
        v += 1 << 64
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode(fs) -> bytes:
    out = bytearray()
    for num, wt, v in fs:
        out += _enc_varint(num << 3 | wt)
        if wt == 0:
            out += _enc_varint(v)
        elif wt == 1:
            out += struct.pack("<Q", v)
        elif wt == 2:
            out += _enc_varint(len(v)) + v
        elif wt == 5:
            out += struct.pack("<I", v)
    return bytes(out)


class Model:
    """A ModelProto as editable lists: pieces [(piece str, score float, type int)], and the raw
    field lists of trainer_spec and normalizer_spec (edit them with set_field)."""

    def __init__(self, blob: bytes):
        self.pieces, self.trainer, self.normalizer, self.rest = [], [], [], []
        for num, wt, v in fields(blob):
            if num == 1 and wt == 2:
                p, score, typ = "", 0.0, NORMAL
                for n2, w2, v2 in fields(v):
                    if n2 == 1:
                        p = v2.decode("utf-8")
                    elif n2 == 2:
                        score = struct.unpack("<f", struct.pack("<I", v2))[0]
                    elif n2 == 3:
                        typ = v2
                self.pieces.append((p, score, typ))
            elif num == 2:
                self.trainer = fields(v)
            elif num == 3:
                self.normalizer = fields(v)
            else:
                self.rest.append((num, wt, v))

    @staticmethod
    def get(fs, num, default=None):
        vals = [v for n, _, v in fs if n == num]
        return vals[-1] if vals else default

    @staticmethod
    def set_field(fs, num, wt, value):
        """Replace field `num` (all occurrences) by one with `value`; None removes it."""
        fs[:] = [f for f in fs if f[0] != num]
        if value is not None:
            fs.append((num, wt, value))

    def serialize(self) -> bytes:
        out = []
        for p, score, typ in self.pieces:
            sub = [(1, 2, p.encode("utf-8")), (2, 5, struct.unpack("<I", struct.pack("<f", score))[0])]
            if typ != NORMAL:
                sub.append((3, 0, typ))
            out.append((1, 2, encode(sub)))
        out.append((2, 2, encode(self.trainer)))
        out.append((3, 2, encode(self.normalizer)))
        return encode(out + self.rest)
