import * as grpc from "@grpc/grpc-js";
import { readFileSync } from "node:fs";
import { FarmError } from "./errors.js";

export interface TlsFiles {
  cert: string;
  key: string;
  /** CA bundle: clients verify the server with it; servers require client certificates signed by it. */
  ca: string;
}

/** Server credentials: TLS, and mutual TLS when requireClientCert is set. */
export function serverCredentials(tls: TlsFiles | undefined, requireClientCert = false): grpc.ServerCredentials {
  if (!tls) return grpc.ServerCredentials.createInsecure();
  return grpc.ServerCredentials.createSsl(
    readFileSync(tls.ca),
    [{ private_key: readFileSync(tls.key), cert_chain: readFileSync(tls.cert) }],
    requireClientCert,
  );
}

/** Client credentials: verifies the server with the CA and presents our certificate (mTLS). */
export function channelCredentials(tls: TlsFiles | undefined): grpc.ChannelCredentials {
  if (!tls) return grpc.credentials.createInsecure();
  return grpc.credentials.createSsl(readFileSync(tls.ca), readFileSync(tls.key), readFileSync(tls.cert));
}

export function tlsFromFlags(v: {
  "tls-cert"?: string | undefined;
  "tls-key"?: string | undefined;
  "tls-ca"?: string | undefined;
}): TlsFiles | undefined {
  const given = [v["tls-cert"], v["tls-key"], v["tls-ca"]].filter((x) => x !== undefined).length;
  if (given === 0) return undefined;
  if (given !== 3) throw new Error("--tls-cert, --tls-key and --tls-ca go together");
  return { cert: v["tls-cert"]!, key: v["tls-key"]!, ca: v["tls-ca"]! };
}

/**
 * Tenant API tokens: a JSON object mapping each bearer token to its tenant name, e.g.
 * {"s3cr3t": "studio-a"}. A client sends "authorization: Bearer <token>".
 */
export class TokenAuth {
  private constructor(private readonly tokens: ReadonlyMap<string, string>) {}

  static fromFile(path: string): TokenAuth {
    let parsed: unknown;
    try {
      parsed = JSON.parse(readFileSync(path, "utf8"));
    } catch (err) {
      throw new Error(`cannot read API tokens from ${path}: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
    }
    if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
      throw new Error(`${path} must hold a JSON object of token → tenant`);
    }
    const m = new Map<string, string>();
    for (const [token, tenant] of Object.entries(parsed)) {
      if (typeof tenant !== "string" || tenant === "" || token.length < 16)
        throw new Error(`${path}: every token needs ≥ 16 characters and a tenant name`);
      m.set(token, tenant);
    }
    return new TokenAuth(m);
  }

  static fromMap(tokens: Record<string, string>): TokenAuth {
    return new TokenAuth(new Map(Object.entries(tokens)));
  }

  /** The caller's tenant, or UNAUTHENTICATED. */
  tenantOf(metadata: grpc.Metadata): string {
    const header = metadata.get("authorization")[0]?.toString() ?? "";
    const m = /^Bearer\s+(\S+)$/i.exec(header);
    const tenant = m ? this.tokens.get(m[1]!) : undefined;
    if (!tenant)
      throw new FarmError(grpc.status.UNAUTHENTICATED, m ? "unknown API token" : 'missing "authorization: Bearer <token>" metadata');
    return tenant;
  }
}
