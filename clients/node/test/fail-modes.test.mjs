// Client-side behaviour that needs no real server: fail modes, deadlines, the API key
// header, unknown verdicts, and the USD conversion. The stand-in server speaks the
// same contract, loaded from the same .proto the client uses.
import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { after, before, describe, it } from 'node:test';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { DecisionClient, SpendgateUnavailable, usdToNano } from '@spendgate/client';

const FINGERPRINT = new Uint8Array(32);
const CALL = { sessionId: 's', model: 'm', inputTokens: 1, maxOutputTokens: 1, fingerprint: FINGERPRINT };
const silent = { warn() {} };

/** A port nobody listens on: bind port 0, read it back, close. */
async function closedPort() {
  const probe = createServer();
  await new Promise((resolve) => probe.listen(0, '127.0.0.1', resolve));
  const { port } = probe.address();
  await new Promise((resolve) => probe.close(resolve));
  return port;
}

/** An in-process DecisionService whose Decide does what `handler` says. */
async function standInServer(handler) {
  const { PROTO_DIR } = await import('../dist/wire.js');
  const definition = protoLoader.loadSync('spendgate/v1/decision.proto', { includeDirs: [PROTO_DIR] });
  const { DecisionService } = grpc.loadPackageDefinition(definition).spendgate.v1;
  const server = new grpc.Server();
  server.addService(DecisionService.service, { Decide: handler, Settle: handler });
  const port = await new Promise((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (error, bound) =>
      error ? reject(error) : resolve(bound),
    ),
  );
  return { target: `127.0.0.1:${port}`, stop: () => server.forceShutdown() };
}

describe('when the service is unreachable', () => {
  let target;
  before(async () => {
    target = `127.0.0.1:${await closedPort()}`;
  });

  it('fail-open allows the call without a reservation, and counts it', async () => {
    const client = new DecisionClient({ target, failMode: 'open', logger: silent });
    const decision = await client.decide(CALL);
    client.close();

    assert.equal(decision.verdict, 'allow');
    assert.equal(decision.failOpen, true);
    assert.equal(decision.effectiveModel, 'm');
    assert.equal(decision.reservationId, '');
    assert.match(decision.reason, /^fail open: spendgate UNAVAILABLE$/);
    assert.equal(client.stats.failOpenAllowances, 1);
  });

  it('fail-closed throws SpendgateUnavailable with the gRPC error as cause', async () => {
    const client = new DecisionClient({ target, failMode: 'closed' });
    await assert.rejects(client.decide(CALL), (error) => {
      assert.ok(error instanceof SpendgateUnavailable);
      assert.equal(error.cause.code, grpc.status.UNAVAILABLE);
      assert.match(error.message, /did not answer \(UNAVAILABLE\); failMode is "closed"/);
      return true;
    });
    client.close();
  });

  it('settle retries, then gives up with null instead of throwing', async () => {
    const client = new DecisionClient({ target, logger: silent });
    const settled = await client.settle({ sessionId: 's', reservationId: 'r', model: 'm' });
    client.close();

    assert.equal(settled, null);
    assert.deepEqual(client.stats.snapshot(), {
      decisions: 0,
      failOpenAllowances: 0,
      settleRetries: 2,
      settleFailures: 1,
    });
  });
});

describe('against a stand-in server', () => {
  let server;
  let seen;
  let reply;
  before(async () => {
    server = await standInServer((call, callback) => {
      seen = call.metadata.get('authorization');
      reply(callback);
    });
  });
  after(() => server.stop());

  it('sends the API key as authorization: Bearer metadata', async () => {
    reply = (callback) => callback(null, { verdict: 'VERDICT_ALLOW' });
    const client = new DecisionClient({ target: server.target, apiKey: 'sg-test-key', failMode: 'closed' });
    await client.decide(CALL);
    client.close();

    assert.deepEqual(seen, ['Bearer sg-test-key']);
  });

  it('sends no authorization header without a key', async () => {
    reply = (callback) => callback(null, { verdict: 'VERDICT_ALLOW' });
    const saved = process.env.SPENDGATE_API_KEY;
    delete process.env.SPENDGATE_API_KEY;
    const client = new DecisionClient({ target: server.target, failMode: 'closed' });
    await client.decide(CALL);
    client.close();
    if (saved !== undefined) process.env.SPENDGATE_API_KEY = saved;

    assert.deepEqual(seen, []);
  });

  it('treats a late answer as an outage once the deadline passes', async () => {
    reply = () => {}; // never answers
    const client = new DecisionClient({ target: server.target, timeoutMillis: 100, failMode: 'open', logger: silent });
    const started = performance.now();
    const decision = await client.decide(CALL);
    const elapsed = performance.now() - started;
    client.close();

    assert.equal(decision.failOpen, true);
    assert.match(decision.reason, /DEADLINE_EXCEEDED/);
    assert.ok(elapsed < 2_000, `decide took ${elapsed} ms with a 100 ms deadline`);
  });

  it('reads a verdict it does not know as a block, never as an allow', async () => {
    reply = (callback) => callback(null, { verdict: 99, rule: 99 });
    const client = new DecisionClient({ target: server.target, failMode: 'closed' });
    const decision = await client.decide(CALL);
    client.close();

    assert.equal(decision.verdict, 'block');
    assert.equal(decision.rule, null);
    assert.throws(() => decision.raiseForBlock(), (error) => error.constructor.name === 'EnforcementError');
  });
});

describe('options', () => {
  it('rejects a fail mode or deadline it cannot honour', () => {
    assert.throws(() => new DecisionClient({ failMode: 'ajar' }), RangeError);
    assert.throws(() => new DecisionClient({ timeoutMillis: 0 }), RangeError);
  });

  it('converts US dollars to nano-USD exactly, rounding up', () => {
    assert.equal(usdToNano('k', 0.1), 100_000_000n);
    assert.equal(usdToNano('k', '0.004'), 4_000_000n);
    assert.equal(usdToNano('k', 1e-10), 1n);
    assert.equal(usdToNano('k', '1.0000000001'), 1_000_000_001n);
    assert.equal(usdToNano('k', 2500), 2_500_000_000_000n);
    assert.equal(usdToNano('k', 0), 0n);
    for (const bad of [-1, Number.NaN, '', 'abc', '1e999', true, null]) {
      assert.throws(() => usdToNano('k', bad), /enforcementConfig\["k"\]/, String(bad));
    }
  });
});
