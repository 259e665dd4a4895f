// DecisionClient against a real `spendgate serve`: allow, block per rule, downgrade, settle.
import assert from 'node:assert/strict';
import { createHash, randomUUID } from 'node:crypto';
import { after, before, describe, it } from 'node:test';

import {
  DecisionClient,
  DuplicateRequest,
  EnforcementError,
  InvalidRequest,
  SessionBudgetExceeded,
  SpendgateError,
  TokenCeilingExceeded,
  ToolCallLimitExceeded,
} from '@spendgate/client';

import { startSpendgate } from './spendgate-server.mjs';

// 1 USD per million tokens = 1_000 nano-USD per token.
const SERVER_CONFIG = {
  enforcement: { token_ceiling: 1000 },
  prices: {
    'sg-large': { input_usd_per_mtok: 10, output_usd_per_mtok: 30 },
    'sg-small': { input_usd_per_mtok: 1, output_usd_per_mtok: 2 },
  },
};

let server;
let client;

before(async () => {
  server = await startSpendgate(SERVER_CONFIG);
  client = new DecisionClient({ target: server.target, timeoutMillis: 5000, failMode: 'closed' });
});

after(async () => {
  client?.close();
  await server?.stop();
});

/** A fresh session per test, so no test sees another's state. */
const session = () => `node-${randomUUID()}`;
const fingerprintOf = (text) => createHash('sha256').update(text).digest();
const call = (overrides = {}) => ({
  sessionId: session(),
  model: 'sg-small',
  inputTokens: 100,
  maxOutputTokens: 50,
  fingerprint: fingerprintOf(randomUUID()),
  ...overrides,
});

describe('decide', () => {
  it('allows a call within every limit and reserves its worst-case cost', async () => {
    const decision = await client.decide(call());

    assert.equal(decision.verdict, 'allow');
    assert.equal(decision.allowed, true);
    assert.equal(decision.failOpen, false);
    assert.equal(decision.effectiveModel, 'sg-small');
    assert.equal(decision.rule, null);
    assert.equal(decision.estimatedCostNanoUsd, 100n * 1_000n + 50n * 2_000n);
    assert.equal(decision.sessionSpendNanoUsd, decision.estimatedCostNanoUsd);
    assert.equal(decision.remainingBudgetNanoUsd, null);
    assert.match(decision.reservationId, /.+/);
    assert.match(decision.decisionId, /.+/);
    decision.raiseForBlock(); // does nothing when allowed
  });

  it('blocks above the server-side token_ceiling with TokenCeilingExceeded', async () => {
    const decision = await client.decide(call({ inputTokens: 5000 }));

    assert.equal(decision.verdict, 'block');
    assert.equal(decision.allowed, false);
    assert.equal(decision.rule, 'token_ceiling');
    assert.equal(decision.reservationId, '');
    assert.throws(() => decision.raiseForBlock(), (error) => {
      assert.ok(error instanceof TokenCeilingExceeded);
      assert.ok(error instanceof EnforcementError);
      assert.ok(error instanceof SpendgateError);
      assert.equal(error.name, 'TokenCeilingExceeded');
      assert.equal(error.rule, 'token_ceiling');
      assert.equal(error.reason, decision.reason);
      assert.equal(error.decisionId, decision.decisionId);
      assert.match(error.message, /^token_ceiling: .+ \(decision [0-9a-f]+\)$/);
      return true;
    });
  });

  it('downgrades an expensive call to the fallback model and prices it there', async () => {
    const decision = await client.decide(
      call({
        model: 'sg-large',
        enforcementConfig: { model_downgrade: { threshold_usd: '0.0001', fallback: 'sg-small' } },
      }),
    );

    assert.equal(decision.verdict, 'allow_downgraded');
    assert.equal(decision.allowed, true);
    assert.equal(decision.effectiveModel, 'sg-small');
    assert.equal(decision.rule, 'model_downgrade');
    assert.equal(decision.estimatedCostNanoUsd, 100n * 1_000n + 50n * 2_000n);
    assert.match(decision.reservationId, /.+/);
  });

  it('throws the typed error of each stateful rule', async () => {
    const budget = call({ enforcementConfig: { max_session_usd: 0.0001 } });
    assert.equal((await client.decide(budget)).verdict, 'allow'); // crossing mode: the first call crosses
    const overBudget = await client.decide({ ...budget, fingerprint: fingerprintOf(randomUUID()) });
    assert.throws(() => overBudget.raiseForBlock(), SessionBudgetExceeded);
    assert.equal(overBudget.remainingBudgetNanoUsd, 0n);

    const repeated = call({ enforcementConfig: { dedup_ttl_seconds: 60 } });
    assert.equal((await client.decide(repeated)).verdict, 'allow');
    const duplicate = await client.decide(repeated);
    assert.throws(() => duplicate.raiseForBlock(), (error) => error instanceof DuplicateRequest && error.rule === 'dedup_ttl_seconds');

    const tools = await client.decide(call({ toolCallCount: 3, enforcementConfig: { max_tool_calls: 2 } }));
    assert.throws(() => tools.raiseForBlock(), (error) => error instanceof ToolCallLimitExceeded && error.rule === 'max_tool_calls');
  });

  it('reports a malformed request as InvalidRequest naming the fields', async () => {
    await assert.rejects(client.decide(call({ sessionId: '', fingerprint: new Uint8Array(3) })), (error) => {
      assert.ok(error instanceof InvalidRequest);
      assert.match(error.message, /^INVALID_ARGUMENT: /);
      assert.deepEqual(error.fieldViolations.map((v) => v.field).sort(), ['fingerprint', 'session_id']);
      return true;
    });
  });

  it('rejects an unknown enforcementConfig key before any RPC', async () => {
    const before = client.stats.decisions;
    await assert.rejects(client.decide(call({ enforcementConfig: { token_cieling: 10 } })), /unknown key "token_cieling"/);
    assert.equal(client.stats.decisions, before);
  });
});

describe('settle', () => {
  it('replaces the reservation with the actual cost, once', async () => {
    const request = call();
    const decision = await client.decide(request);
    const settle = {
      sessionId: request.sessionId,
      reservationId: decision.reservationId,
      model: decision.effectiveModel,
      inputTokens: 80,
      outputTokens: 20,
    };

    const first = await client.settle(settle);
    assert.deepEqual(first, { costNanoUsd: 120_000n, sessionSpendNanoUsd: 120_000n, alreadySettled: false });
    const again = await client.settle(settle);
    assert.deepEqual(again, { costNanoUsd: 120_000n, sessionSpendNanoUsd: 120_000n, alreadySettled: true });
  });

  it('releases the reservation when the provider call failed', async () => {
    const request = call();
    const decision = await client.decide(request);

    const settled = await client.settle({
      sessionId: request.sessionId,
      reservationId: decision.reservationId,
      model: decision.effectiveModel,
      providerOk: false,
    });
    assert.deepEqual(settled, { costNanoUsd: 0n, sessionSpendNanoUsd: 0n, alreadySettled: false });
  });
});
