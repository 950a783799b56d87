// Throwaway certificates for TLS tests: a CA, and a leaf for 127.0.0.1/localhost used by both
// server and client (mTLS), generated with the openssl CLI.
import { execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export interface TestCerts {
  dir: string;
  ca: string;
  cert: string;
  key: string;
}

export function makeCerts(): TestCerts {
  const dir = mkdtempSync(join(tmpdir(), "latentfarm-certs-"));
  const f = (n: string): string => join(dir, n);
  const ssl = (...args: string[]): void => void execFileSync("openssl", args, { stdio: "ignore" });
  ssl(
    "req",
    "-x509",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
    "-keyout",
    f("ca.key"),
    "-out",
    f("ca.crt"),
    "-days",
    "2",
    "-subj",
    "/CN=latentfarm-test-ca",
  );
  writeFileSync(f("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n");
  ssl(
    "req",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
    "-keyout",
    f("tls.key"),
    "-out",
    f("tls.csr"),
    "-subj",
    "/CN=localhost",
  );
  ssl(
    "x509",
    "-req",
    "-in",
    f("tls.csr"),
    "-CA",
    f("ca.crt"),
    "-CAkey",
    f("ca.key"),
    "-CAcreateserial",
    "-out",
    f("tls.crt"),
    "-days",
    "2",
    "-extfile",
    f("ext.cnf"),
  );
  return { dir, ca: f("ca.crt"), cert: f("tls.crt"), key: f("tls.key") };
}
