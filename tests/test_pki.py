"""llmrouter-pki: CA creation, issuance, chains, expiry defaults, file modes and renewal."""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import crypto
from twisted.trial import unittest

from llmrouter.ops import pki

NOW = datetime.datetime(2026, 11, 23, 12, 0, tzinfo=datetime.UTC)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = pki.main(list(argv))
    return code, out.getvalue(), err.getvalue()


class PKITestCase(unittest.TestCase):
    def setUp(self) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="pki-test-"))
        self.addCleanup(shutil.rmtree, tmp)
        self.dir = tmp / "pki"


class CATests(PKITestCase):
    def test_create_ca_files_and_modes(self) -> None:
        cert = pki.create_ca(self.dir, now=NOW)
        # services read their own files in it; each key is guarded by its own mode
        self.assertEqual(_mode(self.dir), 0o755)
        self.assertEqual(_mode(self.dir / "ca.key"), 0o600)
        self.assertEqual(_mode(self.dir / "ca.crt"), 0o644)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(bc.critical)
        self.assertTrue(bc.value.ca)
        self.assertEqual(bc.value.path_length, 0)
        self.assertTrue(cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign)
        self.assertIsInstance(cert.public_key(), ec.EllipticCurvePublicKey)
        self.assertEqual(
            cert.not_valid_after_utc - NOW, datetime.timedelta(days=pki.DEFAULT_CA_DAYS)
        )

    def test_refuses_to_overwrite_ca(self) -> None:
        pki.create_ca(self.dir, now=NOW)
        before = (self.dir / "ca.key").read_bytes()
        with self.assertRaises(pki.PKIError):
            pki.create_ca(self.dir, now=NOW)
        self.assertEqual((self.dir / "ca.key").read_bytes(), before)

    def test_issue_without_ca_is_a_clear_error(self) -> None:
        with self.assertRaises(pki.PKIError) as cm:
            pki.issue(self.dir, "server", "inf", dns_names=["inf"])
        self.assertIn("init-ca", str(cm.exception))


class IssueTests(PKITestCase):
    def setUp(self) -> None:
        super().setUp()
        pki.create_ca(self.dir, now=NOW)

    def test_server_certificate(self) -> None:
        cert = pki.issue(
            self.dir,
            "server",
            "inference-1",
            ["inference-1.wg", "localhost"],
            ["10.8.0.2"],
            now=NOW,
        )
        self.assertEqual(_mode(self.dir / "inference-1.key"), 0o600)
        self.assertEqual(_cert(self.dir / "inference-1.crt"), cert)
        # default lifetime: 7 days from now (backdated a few minutes for clock skew)
        self.assertEqual(cert.not_valid_after_utc, NOW + datetime.timedelta(days=7))
        self.assertEqual(cert.not_valid_before_utc, NOW - pki.BACKDATE)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["inference-1.wg", "localhost"])
        self.assertEqual([str(i) for i in san.get_values_for_type(x509.IPAddress)], ["10.8.0.2"])
        self.assertFalse(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        for host in ("inference-1.wg", "localhost", "10.8.0.2"):
            pki.verify(self.dir, "inference-1", host, now=NOW)

    def test_client_certificate(self) -> None:
        cert = pki.issue(self.dir, "client", "router", now=NOW)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.CLIENT_AUTH])
        self.assertEqual(_mode(self.dir / "router.key"), 0o600)
        pki.verify(self.dir, "router", now=NOW)

    def test_client_certificate_is_not_a_server_certificate(self) -> None:
        from cryptography.x509 import verification as v

        pki.issue(self.dir, "client", "router", now=NOW)
        ca = _cert(self.dir / "ca.crt")
        verifier = (
            v.PolicyBuilder()
            .store(v.Store([ca]))
            .time(NOW)
            .build_server_verifier(v.DNSName("router"))  # type: ignore[attr-defined]
        )
        with self.assertRaises(v.VerificationError):
            verifier.verify(_cert(self.dir / "router.crt"), [])

    def test_chain_verifies_with_pyopenssl(self) -> None:
        pki.issue(self.dir, "server", "inf", ["localhost"], now=NOW)
        store = crypto.X509Store()
        store.add_cert(crypto.X509.from_cryptography(_cert(self.dir / "ca.crt")))
        store.set_time(NOW.replace(tzinfo=None) + datetime.timedelta(hours=1))
        leaf = crypto.X509.from_cryptography(_cert(self.dir / "inf.crt"))
        crypto.X509StoreContext(store, leaf).verify_certificate()
        # and not against another CA
        other = self.dir.parent / "other"
        pki.create_ca(other, now=NOW)
        store2 = crypto.X509Store()
        store2.add_cert(crypto.X509.from_cryptography(_cert(other / "ca.crt")))
        with self.assertRaises(crypto.X509StoreContextError):
            crypto.X509StoreContext(store2, leaf).verify_certificate()

    def test_chain_verifies_with_openssl_cli(self) -> None:
        if shutil.which("openssl") is None:
            if os.environ.get("CI") == "true":
                self.fail("openssl missing in CI: run etc/dev/ci-deps")
            raise unittest.SkipTest("openssl not installed")
        pki.issue(self.dir, "server", "inf", ["localhost"])
        result = subprocess.run(
            ["openssl", "verify", "-CAfile", str(self.dir / "ca.crt"), str(self.dir / "inf.crt")],
            capture_output=True,
            text=True,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_wrong_server_name_expired_and_wrong_ca_fail_verification(self) -> None:
        pki.issue(self.dir, "server", "inf", ["inference-1.wg"], now=NOW)
        with self.assertRaises(pki.PKIError):
            pki.verify(self.dir, "inf", "inference-2.wg", now=NOW)
        with self.assertRaises(pki.PKIError):
            pki.verify(self.dir, "inf", "inference-1.wg", now=NOW + datetime.timedelta(days=8))
        with self.assertRaises(pki.PKIError):
            pki.verify(self.dir, "inf", "inference-1.wg", now=NOW - datetime.timedelta(hours=1))
        # a certificate and key moved over from another CA's directory
        other = self.dir.parent / "other"
        pki.create_ca(other, now=NOW)
        pki.issue(other, "server", "inf", ["inference-1.wg"], now=NOW)
        shutil.copy(other / "inf.crt", self.dir / "inf.crt")
        shutil.copy(other / "inf.key", self.dir / "inf.key")
        with self.assertRaises(pki.PKIError):
            pki.verify(self.dir, "inf", "inference-1.wg", now=NOW)

    def test_key_mismatch_detected(self) -> None:
        pki.issue(self.dir, "server", "a", ["a"], now=NOW)
        pki.issue(self.dir, "server", "b", ["a"], now=NOW)
        shutil.copy(self.dir / "b.key", self.dir / "a.key")
        with self.assertRaises(pki.PKIError) as cm:
            pki.verify(self.dir, "a", now=NOW)
        self.assertIn("does not belong", str(cm.exception))

    def test_refusals(self) -> None:
        with self.assertRaises(pki.PKIError):
            pki.issue(self.dir, "server", "no-names", now=NOW)
        for bad in ("../evil", "ca", "", "a/b", ".hidden"):
            with self.assertRaises(pki.PKIError):
                pki.issue(self.dir, "client", bad, now=NOW)
        with self.assertRaises(pki.PKIError):
            pki.issue(self.dir, "server", "x", ip_addresses=["10.0.0.300"], now=NOW)
        with self.assertRaises(pki.PKIError):
            pki.issue(self.dir, "server", "x", ["x"], lifetime=datetime.timedelta(0), now=NOW)
        with self.assertRaises(pki.PKIError):
            pki.issue(self.dir, "server", "x", ["x"], lifetime=datetime.timedelta(days=5000))
        self.assertEqual(sorted(p.name for p in self.dir.iterdir()), ["ca.crt", "ca.key"])

    def test_ed25519(self) -> None:
        ed = self.dir.parent / "ed"
        ca = pki.create_ca(ed, algorithm="ed25519", now=NOW)
        self.assertIsInstance(ca.public_key(), ed25519.Ed25519PublicKey)
        cert = pki.issue(ed, "server", "inf", ["localhost"], algorithm="ed25519", now=NOW)
        self.assertIsInstance(cert.public_key(), ed25519.Ed25519PublicKey)
        pki.verify(ed, "inf", "localhost", now=NOW)

    def test_serials_are_unique(self) -> None:
        serials = {pki.issue(self.dir, "client", f"c{i}", now=NOW).serial_number for i in range(20)}
        self.assertEqual(len(serials), 20)


class RenewTests(PKITestCase):
    def setUp(self) -> None:
        super().setUp()
        pki.create_ca(self.dir, now=NOW)
        pki.issue(self.dir, "server", "inf", ["inf.wg"], ["10.8.0.2"], now=NOW)
        pki.issue(self.dir, "client", "router", lifetime=datetime.timedelta(hours=36), now=NOW)

    def test_if_expiring_within_renews_only_those(self) -> None:
        later = NOW + datetime.timedelta(days=1)  # router has 12 h left, inf has 6 days
        old_inf = (self.dir / "inf.crt").read_bytes()
        old_router_key = (self.dir / "router.key").read_bytes()
        renewed = pki.renew(self.dir, if_expiring_within=datetime.timedelta(days=1), now=later)
        self.assertEqual(renewed, ["router"])
        self.assertEqual((self.dir / "inf.crt").read_bytes(), old_inf)
        router = _cert(self.dir / "router.crt")
        # same lifetime as before, counted from the renewal; a fresh key
        self.assertEqual(router.not_valid_after_utc, later + datetime.timedelta(hours=36))
        self.assertNotEqual((self.dir / "router.key").read_bytes(), old_router_key)
        self.assertEqual(_mode(self.dir / "router.key"), 0o600)
        pki.verify(self.dir, "router", now=later)
        # nothing left to do right after
        self.assertEqual(
            pki.renew(self.dir, if_expiring_within=datetime.timedelta(days=1), now=later), []
        )

    def test_renew_keeps_names_and_kind(self) -> None:
        later = NOW + datetime.timedelta(days=6)
        self.assertEqual(pki.renew(self.dir, ["inf"], now=later), ["inf"])
        info = pki.inspect(self.dir / "inf.crt")
        self.assertEqual(info.kind, "server")
        self.assertEqual(info.dns_names, ("inf.wg",))
        self.assertEqual(info.ip_addresses, ("10.8.0.2",))
        self.assertEqual(info.not_after, later + datetime.timedelta(days=7))
        pki.verify(self.dir, "inf", "10.8.0.2", now=later)

    def test_renew_expired_certificate(self) -> None:
        much_later = NOW + datetime.timedelta(days=30)
        with self.assertRaises(pki.PKIError):
            pki.verify(self.dir, "inf", now=much_later)
        pki.renew(self.dir, if_expiring_within=datetime.timedelta(days=2), now=much_later)
        pki.verify(self.dir, "inf", now=much_later)
        pki.verify(self.dir, "router", now=much_later)

    def test_renewal_keeps_owner_group_and_mode(self) -> None:
        """A key the router reads (0640 root:llmrouter) stays readable to it after renewal
        (finding: renewal used to rewrite it 0600 root:root and the router failed at restart).
        Tests run as root: the owners below are another user's, as in production."""
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root (chown)")
        os.chown(self.dir / "router.key", 0, 65534)
        os.chmod(self.dir / "router.key", 0o640)
        os.chown(self.dir / "inf.key", 65534, 65534)  # another owner altogether
        os.chmod(self.dir / "inf.key", 0o644)  # too open: renewal drops "other"
        os.chmod(self.dir / "inf.crt", 0o640)
        before = {n: (self.dir / n).read_bytes() for n in ("router.key", "inf.key")}
        pki.renew(self.dir, now=NOW + datetime.timedelta(days=6))
        for name, (uid, gid, mode) in {
            "router.key": (0, 65534, 0o640),
            "inf.key": (65534, 65534, 0o640),
            "inf.crt": (0, 0, 0o640),
            "router.crt": (0, 0, 0o644),
        }.items():
            st = (self.dir / name).stat()
            self.assertEqual((st.st_uid, st.st_gid, _mode(self.dir / name)), (uid, gid, mode), name)
        for name, old in before.items():
            self.assertNotEqual((self.dir / name).read_bytes(), old, name)

    def test_issue_with_group(self) -> None:
        import grp

        group = grp.getgrgid(os.getgid()).gr_name
        code, _, err = _run("--dir", str(self.dir), "issue", "client", "router", "--group", group)
        self.assertEqual((code, err), (0, ""))
        st = (self.dir / "router.key").stat()
        self.assertEqual((st.st_gid, _mode(self.dir / "router.key")), (os.getgid(), 0o640))
        pki.renew(self.dir, ["router"], now=NOW + datetime.timedelta(days=1))
        self.assertEqual(_mode(self.dir / "router.key"), 0o640)  # renewal keeps it
        code, _, err = _run(
            "--dir", str(self.dir), "issue", "client", "x", "--group", "no-such-group-x"
        )
        self.assertEqual(code, 2)
        self.assertIn("no group 'no-such-group-x'", err)
        self.assertFalse((self.dir / "x.key").exists())

    def test_keep_key(self) -> None:
        key = (self.dir / "inf.key").read_bytes()
        pki.renew(self.dir, ["inf"], keep_key=True, now=NOW + datetime.timedelta(days=1))
        self.assertEqual((self.dir / "inf.key").read_bytes(), key)
        pki.verify(self.dir, "inf", now=NOW + datetime.timedelta(days=1))


class CLITests(PKITestCase):
    def test_full_cycle(self) -> None:
        d = str(self.dir)
        self.assertEqual(_run("--dir", d, "init-ca")[0], 0)
        code, _, err = _run("--dir", d, "init-ca")
        self.assertEqual(code, 2)
        self.assertIn("refusing to overwrite", err)
        code, out, _ = _run(
            "--dir", d, "issue", "server", "inf", "--dns", "localhost", "--ip", "127.0.0.1"
        )
        self.assertEqual(code, 0, out)
        self.assertEqual(_run("--dir", d, "issue", "client", "router", "--lifetime", "1d")[0], 0)
        self.assertEqual(_run("--dir", d, "verify", "inf", "--server-name", "127.0.0.1")[0], 0)
        self.assertEqual(_run("--dir", d, "verify", "inf", "--server-name", "example.org")[0], 2)
        code, out, _ = _run("--dir", d, "list")
        self.assertEqual(code, 0)
        lines = out.splitlines()
        self.assertEqual([line.split()[0] for line in lines], ["ca", "inf", "router"])
        self.assertIn("localhost,127.0.0.1", lines[1])
        # router (1 day) is within 2 days of expiry, inf (7 days) is not
        code, _, err = _run("--dir", d, "check", "--within", "2d")
        self.assertEqual(code, 1)
        self.assertIn("router", err)
        self.assertNotIn("inf", err)
        code, out, _ = _run("--dir", d, "renew", "--if-expiring-within", "2d", "--lifetime", "3d")
        self.assertEqual((code, out.strip()), (0, "renewed: router"))
        code, out, _ = _run("--dir", d, "renew", "--if-expiring-within", "2d")
        self.assertEqual((code, out.strip()), (0, "renewed: nothing"))
        self.assertEqual(_run("--dir", d, "check", "--within", "12h")[0], 0)
        code, out, _ = _run("--dir", d, "inspect", str(self.dir / "inf.crt"))
        self.assertEqual(code, 0)
        self.assertIn("kind: server", out)

    def test_console_script(self) -> None:
        script = shutil.which("llmrouter-pki", path=str(Path(os.sys.executable).parent))
        self.assertIsNotNone(script, "llmrouter-pki console script not installed")
        assert script is not None
        result = subprocess.run(
            [script, "--dir", str(self.dir), "init-ca", "--algorithm", "ed25519"],
            capture_output=True,
            text=True,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(_mode(self.dir / "ca.key"), 0o600)

    def test_durations(self) -> None:
        self.assertEqual(pki.parse_duration("2d"), datetime.timedelta(days=2))
        self.assertEqual(pki.parse_duration("36h"), datetime.timedelta(hours=36))
        self.assertEqual(pki.parse_duration("90"), datetime.timedelta(seconds=90))
        self.assertEqual(pki.parse_duration("1w"), datetime.timedelta(days=7))
        for bad in ("", "2 days", "-1d", "d"):
            with self.assertRaises(pki.PKIError):
                pki.parse_duration(bad)
        self.assertEqual(_run("--dir", str(self.dir), "check", "--within", "soon")[0], 2)
