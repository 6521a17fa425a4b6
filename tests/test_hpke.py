"""RFC 9180 conformance (Appendix A.2 vectors) and misuse cases for llmrouter.hpke."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from llmrouter import hpke

# RFC 9180 Appendix A.2 as published, copied from the team's ../shared/vectors/ so that a clone
# checked out anywhere runs the conformance tests; SharedCopyTests checks the copy still matches.
_NAME = "rfc9180-a2-x25519-sha256-chacha20poly1305.txt"
VECTORS = Path(__file__).resolve().parent / "vectors" / _NAME
SHARED_VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / _NAME

_SECTIONS = {
    "Base Setup Information": hpke.Mode.BASE,
    "PSK Setup Information": hpke.Mode.PSK,
    "Auth Setup Information": hpke.Mode.AUTH,
    "AuthPSK Setup Information": hpke.Mode.AUTH_PSK,
}


def _parse_record(lines: list[str]) -> dict[str, str]:
    """Fields are ``name: hex``; long hex values continue on following lines."""
    record: dict[str, str] = {}
    name = None
    for line in lines:
        if ":" in line:
            name, _, value = line.partition(":")
            record[name.strip()] = value.strip()
        elif name is not None:
            record[name] += line.strip()
    return record


def load_vectors(path: Path = VECTORS) -> dict[hpke.Mode, dict[str, Any]]:
    """Parse the RFC text into {mode: {"setup": {}, "encryptions": [], "exports": []}}."""
    out: dict[hpke.Mode, dict[str, Any]] = {}
    mode: hpke.Mode | None = None
    part = ""
    block: list[str] | None = None
    for raw in path.read_text().splitlines():
        line = raw.rstrip()
        if line.startswith("## "):
            if out:
                break  # the file goes on with other suites (P-256, ...): ours is the first
            continue
        if line.startswith("### "):
            mode = _SECTIONS[line[4:].strip()]
            out[mode] = {"setup": {}, "encryptions": [], "exports": []}
            part = "setup"
        elif line.startswith("#### "):
            part = {"Encryptions": "encryptions", "Exported Values": "exports"}[line[5:].strip()]
        elif line == "~~~":
            if block is None:
                block = []
                continue
            assert mode is not None
            records = [_parse_record(r.splitlines()) for r in "\n".join(block).split("\n\n")]
            if part == "setup":
                out[mode]["setup"] = records[0]
            else:
                out[mode][part] = [r for r in records if r]
            block = None
        elif block is not None:
            block.append(line)
    return out


def h(value: str) -> bytes:
    return bytes.fromhex(value)


class VectorTests(SynchronousTestCase):
    """Every published value of RFC 9180 A.2, in all four modes."""

    vectors = load_vectors()

    def test_parsed_everything(self) -> None:
        self.assertEqual(set(self.vectors), set(hpke.Mode))
        for mode, v in self.vectors.items():
            self.assertEqual(int(v["setup"]["mode"]), mode)
            self.assertEqual(int(v["setup"]["kem_id"]), hpke.KEM_ID)
            self.assertEqual(int(v["setup"]["kdf_id"]), hpke.KDF_ID)
            self.assertEqual(int(v["setup"]["aead_id"]), hpke.AEAD_ID)
            self.assertGreaterEqual(len(v["encryptions"]), 6)
            self.assertEqual(len(v["exports"]), 3)

    def _check_mode(self, mode: hpke.Mode) -> None:
        v = self.vectors[mode]
        s = v["setup"]
        info = h(s["info"])
        # DeriveKeyPair(ikm) for every key pair in the vector.
        eph = hpke.derive_key_pair(h(s["ikmE"]))
        self.assertEqual(eph.sk, h(s["skEm"]))
        self.assertEqual(eph.pk, h(s["pkEm"]))
        recipient = hpke.derive_key_pair(h(s["ikmR"]))
        self.assertEqual(recipient.sk, h(s["skRm"]))
        self.assertEqual(recipient.pk, h(s["pkRm"]))
        sender: hpke.KeyPair | None = None
        if mode in (hpke.Mode.AUTH, hpke.Mode.AUTH_PSK):
            sender = hpke.derive_key_pair(h(s["ikmS"]))
            self.assertEqual(sender.sk, h(s["skSm"]))
            self.assertEqual(sender.pk, h(s["pkSm"]))
        psk = h(s.get("psk", ""))
        psk_id = h(s.get("psk_id", ""))

        # The KEM: Encap and Decap agree on the published shared secret.
        shared, enc = hpke._encap(recipient.pk, sender.sk if sender else None, eph)
        self.assertEqual(enc, h(s["enc"]))
        self.assertEqual(shared, h(s["shared_secret"]))
        decapped = hpke._decap(enc, recipient.sk, sender.pk if sender else None)
        self.assertEqual(decapped, h(s["shared_secret"]))

        # The key schedule, through the public setup functions.
        enc, sctx = hpke.setup_s(
            recipient.pk,
            info,
            sk_s=sender.sk if sender else None,
            psk=psk,
            psk_id=psk_id,
            ephemeral=eph,
        )
        rctx = hpke.setup_r(
            enc, recipient.sk, info, pk_s=sender.pk if sender else None, psk=psk, psk_id=psk_id
        )
        for ctx in (sctx, rctx):
            self.assertEqual(ctx.key, h(s["key"]))
            self.assertEqual(ctx.base_nonce, h(s["base_nonce"]))
            self.assertEqual(ctx.exporter_secret, h(s["exporter_secret"]))

        # Every encryption, in sequence order (sequence numbers jump in the RFC's listing).
        for rec in v["encryptions"]:
            seq = int(rec["sequence number"])
            sctx.seq = rctx.seq = seq
            self.assertEqual(sctx._nonce(), h(rec["nonce"]))
            ct = sctx.seal(h(rec["aad"]), h(rec["pt"]))
            self.assertEqual(ct, h(rec["ct"]))
            self.assertEqual(rctx.open(h(rec["aad"]), ct), h(rec["pt"]))
            self.assertEqual(sctx.seq, seq + 1)
            self.assertEqual(rctx.seq, seq + 1)

        # Every export, from both sides.
        for rec in v["exports"]:
            expected = h(rec["exported_value"])
            ctx_bytes = h(rec["exporter_context"])
            self.assertEqual(sctx.export(ctx_bytes, int(rec["L"])), expected)
            self.assertEqual(rctx.export(ctx_bytes, int(rec["L"])), expected)

    def test_base(self) -> None:
        self._check_mode(hpke.Mode.BASE)

    def test_psk(self) -> None:
        self._check_mode(hpke.Mode.PSK)

    def test_auth(self) -> None:
        self._check_mode(hpke.Mode.AUTH)

    def test_auth_psk(self) -> None:
        self._check_mode(hpke.Mode.AUTH_PSK)

    def test_named_base_and_auth_setups(self) -> None:
        """setup_base_* and setup_auth_* are the RFC's SetupBaseS/R and SetupAuthS/R."""
        for mode in (hpke.Mode.BASE, hpke.Mode.AUTH):
            s = self.vectors[mode]["setup"]
            eph = hpke.derive_key_pair(h(s["ikmE"]))
            r = hpke.derive_key_pair(h(s["ikmR"]))
            if mode is hpke.Mode.BASE:
                enc, sctx = hpke.setup_base_s(r.pk, h(s["info"]), ephemeral=eph)
                rctx = hpke.setup_base_r(enc, r.sk, h(s["info"]))
            else:
                snd = hpke.derive_key_pair(h(s["ikmS"]))
                enc, sctx = hpke.setup_auth_s(r.pk, h(s["info"]), snd.sk, ephemeral=eph)
                rctx = hpke.setup_auth_r(enc, r.sk, h(s["info"]), snd.pk)
            self.assertEqual(enc, h(s["enc"]))
            self.assertEqual(sctx.key, h(s["key"]))
            self.assertEqual(rctx.base_nonce, h(s["base_nonce"]))


class MisuseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.r = hpke.generate_key_pair()
        self.s = hpke.generate_key_pair()

    def test_generate_key_pair(self) -> None:
        self.assertEqual(len(self.r.sk), 32)
        self.assertEqual(hpke.public_key(self.r.sk), self.r.pk)
        self.assertNotEqual(hpke.generate_key_pair().sk, self.r.sk)

    def test_single_shot_base(self) -> None:
        enc, ct = hpke.seal_base(self.r.pk, b"info", b"aad", b"hello")
        self.assertEqual(len(ct), 5 + hpke.N_T)
        self.assertEqual(hpke.open_base(enc, self.r.sk, b"info", b"aad", ct), b"hello")

    def test_single_shot_auth(self) -> None:
        enc, ct = hpke.seal_auth(self.r.pk, b"info", b"aad", b"hello", self.s.sk)
        self.assertEqual(hpke.open_auth(enc, self.r.sk, b"info", b"aad", ct, self.s.pk), b"hello")
        other = hpke.generate_key_pair()
        self.assertRaises(
            hpke.OpenError, hpke.open_auth, enc, self.r.sk, b"info", b"aad", ct, other.pk
        )
        # An auth-mode ciphertext does not open in base mode.
        self.assertRaises(hpke.OpenError, hpke.open_base, enc, self.r.sk, b"info", b"aad", ct)

    def test_tamper(self) -> None:
        enc, ct = hpke.seal_base(self.r.pk, b"", b"", b"payload")
        for i in range(len(ct)):
            bad = bytearray(ct)
            bad[i] ^= 0x01
            self.assertRaises(hpke.OpenError, hpke.open_base, enc, self.r.sk, b"", b"", bytes(bad))
        bad_enc = bytearray(enc)
        bad_enc[0] ^= 0x01
        self.assertRaises(hpke.OpenError, hpke.open_base, bytes(bad_enc), self.r.sk, b"", b"", ct)
        self.assertRaises(hpke.OpenError, hpke.open_base, enc, self.r.sk, b"", b"", ct[:-1])
        # shorter than the tag: PyNaCl raised a bare ValueError (a crash in the SSE fuzzer)
        for short in (b"", ct[: hpke.N_T - 1]):
            self.assertRaises(hpke.OpenError, hpke.open_base, enc, self.r.sk, b"", b"", short)

    def test_wrong_key_info_aad(self) -> None:
        enc, ct = hpke.seal_base(self.r.pk, b"info", b"aad", b"payload")
        wrong = hpke.generate_key_pair()
        self.assertRaises(hpke.OpenError, hpke.open_base, enc, wrong.sk, b"info", b"aad", ct)
        self.assertRaises(hpke.OpenError, hpke.open_base, enc, self.r.sk, b"other", b"aad", ct)
        self.assertRaises(hpke.OpenError, hpke.open_base, enc, self.r.sk, b"info", b"aaD", ct)

    def test_replayed_sequence(self) -> None:
        """A ciphertext opens once: the recipient's counter has moved on after it."""
        enc, sctx = hpke.setup_base_s(self.r.pk, b"")
        rctx = hpke.setup_base_r(enc, self.r.sk, b"")
        c0 = sctx.seal(b"", b"first")
        c1 = sctx.seal(b"", b"second")
        self.assertEqual(rctx.open(b"", c0), b"first")
        self.assertRaises(hpke.OpenError, rctx.open, b"", c0)
        self.assertEqual(rctx.seq, 1, "a failed open must not advance the counter")
        self.assertEqual(rctx.open(b"", c1), b"second")
        # Out of order: a skipped message cannot be opened at the wrong sequence.
        c2, c3 = sctx.seal(b"", b"2"), sctx.seal(b"", b"3")
        self.assertRaises(hpke.OpenError, rctx.open, b"", c3)
        self.assertEqual(rctx.open(b"", c2), b"2")

    def test_sequence_overflow(self) -> None:
        enc, sctx = hpke.setup_base_s(self.r.pk, b"")
        rctx = hpke.setup_base_r(enc, self.r.sk, b"")
        limit = (1 << 96) - 1
        sctx.seq = rctx.seq = limit - 1
        ct = sctx.seal(b"", b"last")
        self.assertEqual(rctx.open(b"", ct), b"last")
        self.assertRaises(hpke.MessageLimitReachedError, sctx.seal, b"", b"one too many")
        self.assertRaises(hpke.MessageLimitReachedError, rctx.open, b"", ct)

    def test_small_order_points(self) -> None:
        """Small-order public keys give an all-zero DH output, which must be refused."""
        small_order = [
            bytes(32),
            (1).to_bytes(32, "little"),
            bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
            bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
            ((1 << 255) - 19 - 1).to_bytes(32, "little"),
            ((1 << 255) - 19).to_bytes(32, "little"),
        ]
        for pk in small_order:
            self.assertRaises(hpke.DHError, hpke.setup_base_s, pk, b"")
            self.assertRaises(hpke.DHError, hpke.setup_base_r, pk, self.r.sk, b"")
            self.assertRaises(hpke.DHError, hpke.setup_auth_r, self.s.pk, self.r.sk, b"", pk)

    def test_wrong_lengths(self) -> None:
        self.assertRaises(hpke.InvalidKeyError, hpke.setup_base_s, b"\x01" * 31, b"")
        self.assertRaises(hpke.InvalidKeyError, hpke.setup_base_r, b"\x01" * 33, self.r.sk)
        self.assertRaises(hpke.InvalidKeyError, hpke.setup_base_r, self.r.pk, b"\x01" * 31)
        self.assertRaises(hpke.InvalidKeyError, hpke.derive_key_pair, b"short")

    def test_psk_inputs_checked(self) -> None:
        self.assertRaises(hpke.InvalidPSKError, hpke.setup_s, self.r.pk, b"", psk=b"k" * 32)
        self.assertRaises(hpke.InvalidPSKError, hpke.setup_s, self.r.pk, b"", psk_id=b"id")

    def test_export_length(self) -> None:
        _, sctx = hpke.setup_base_s(self.r.pk, b"")
        self.assertEqual(len(sctx.export(b"x", 255 * 32)), 255 * 32)
        self.assertRaises(hpke.ExportLengthError, sctx.export, b"x", 255 * 32 + 1)

    def test_errors_reveal_nothing(self) -> None:
        """Error text is fixed: no key, nonce or plaintext bytes in str() or repr()."""
        enc, ct = hpke.seal_base(self.r.pk, b"", b"", b"secret payload")
        try:
            hpke.open_base(enc, hpke.generate_key_pair().sk, b"", b"", ct)
        except hpke.OpenError as e:
            text = str(e) + repr(e)
        self.assertEqual(text, "decryption failedOpenError('decryption failed')")
        self.assertNotIn(self.r.sk.hex(), repr(self.r))
        self.assertEqual(repr(self.r), "KeyPair(<redacted>)")
        _, sctx = hpke.setup_base_s(self.r.pk, b"")
        self.assertNotIn(sctx.key.hex(), repr(sctx))


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=60, deadline=None)
    @given(
        messages=st.lists(st.tuples(st.binary(max_size=64), st.binary(max_size=512)), max_size=6),
        info=st.binary(max_size=64),
        auth=st.booleans(),
        exporter_context=st.binary(max_size=32),
    )
    def test_round_trip(
        self,
        messages: list[tuple[bytes, bytes]],
        info: bytes,
        auth: bool,
        exporter_context: bytes,
    ) -> None:
        r = hpke.derive_key_pair(os.urandom(32))
        s = hpke.generate_key_pair() if auth else None
        enc, sctx = hpke.setup_s(r.pk, info, sk_s=s.sk if s else None)
        rctx = hpke.setup_r(enc, r.sk, info, pk_s=s.pk if s else None)
        for aad, pt in messages:
            ct = sctx.seal(aad, pt)
            self.assertEqual(len(ct), len(pt) + hpke.N_T)
            self.assertEqual(rctx.open(aad, ct), pt)
        self.assertEqual(sctx.export(exporter_context, 32), rctx.export(exporter_context, 32))


class SharedCopyTests(SynchronousTestCase):
    def test_copy_matches_shared_vectors(self) -> None:
        if not SHARED_VECTORS.is_file():
            raise SkipTest(f"no {SHARED_VECTORS} on this machine")
        self.assertEqual(VECTORS.read_bytes(), SHARED_VECTORS.read_bytes())
