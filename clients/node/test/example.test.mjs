// The example wrapper against a real `spendgate serve`, with a stand-in provider.
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, it } from 'node:test';

import { DecisionClient, DuplicateRequest, TokenCeilingExceeded } from '@spendgate/client';

import { JournaledAnthropic, standInProvider } from '../example/journaled-anthropic.mjs';
import { startSpendgate } from './spendgate-server.mjs';

let server;
let spendgate;
let settlements;

before(async () => {
  server = await startSpendgate({
    prices: {
      'sg-large': { input_usd_per_mtok: 10, output_usd_per_mtok: 30 },
      'sg-small': { input_usd_per_mtok: 1, output_usd_per_mtok: 2 },
    },
  });
  spendgate = new DecisionClient({ target: server.target, timeoutMillis: 5000, failMode: 'closed' });
  const settle = spendgate.settle.bind(spendgate);
  spendgate.settle = async (input) => {
    const settlement = await settle(input);
    settlements.push({ input, settlement });
    return settlement;
  };
});

after(async () => {
  spendgate?.close();
  await server?.stop();
});

/** A provider that records what it was asked and answers like the Anthropic SDK. */
function recordingProvider(answer = async (params) => ({ model: params.model, usage: { input_tokens: 40, output_tokens: 10 } })) {
  const calls = [];
  return {
    calls,
    messages: {
      async create(params) {
        calls.push(params);
        return answer(params);
      },
    },
  };
}

const PARAMS = { model: 'sg-large', max_tokens: 64, messages: [{ role: 'user', content: 'Say hello.' }] };

describe('JournaledAnthropic example', () => {
  it('runs an allowed call on the effective model and settles its usage', async () => {
    settlements = [];
    const provider = recordingProvider();
    const client = new JournaledAnthropic({
      anthropic: provider,
      spendgate,
      sessionId: `node-${randomUUID()}`,
      enforcementConfig: { model_downgrade: { threshold_usd: '0.0000001', fallback: 'sg-small' } },
    });

    const reply = await client.messages.create(PARAMS);

    assert.equal(provider.calls.length, 1);
    assert.equal(provider.calls[0].model, 'sg-small');
    assert.equal(reply.model, 'sg-small');
    assert.equal(settlements.length, 1);
    assert.equal(settlements[0].input.model, 'sg-small');
    assert.deepEqual(settlements[0].settlement, { costNanoUsd: 60_000n, sessionSpendNanoUsd: 60_000n, alreadySettled: false });
  });

  it('throws the typed error and never contacts the provider when blocked', async () => {
    settlements = [];
    const provider = recordingProvider();
    const client = new JournaledAnthropic({
      anthropic: provider,
      spendgate,
      sessionId: `node-${randomUUID()}`,
      enforcementConfig: { token_ceiling: 1 },
    });

    await assert.rejects(client.messages.create(PARAMS), TokenCeilingExceeded);
    assert.equal(provider.calls.length, 0);
    assert.equal(settlements.length, 0);
  });

  it('releases the reservation when the provider refuses the call, and rethrows its error', async () => {
    settlements = [];
    const refusal = Object.assign(new Error('overloaded'), { status: 529 });
    const client = new JournaledAnthropic({
      anthropic: recordingProvider(async () => {
        throw refusal;
      }),
      spendgate,
      sessionId: `node-${randomUUID()}`,
    });

    await assert.rejects(client.messages.create(PARAMS), (error) => error === refusal);
    assert.equal(settlements.length, 1);
    assert.equal(settlements[0].input.providerOk, false);
    assert.equal(settlements[0].settlement.costNanoUsd, 0n);
  });

  it('leaves the reservation to expire when the outcome is unknown', async () => {
    settlements = [];
    const lost = new Error('socket hang up');
    const client = new JournaledAnthropic({
      anthropic: recordingProvider(async () => {
        throw lost;
      }),
      spendgate,
      sessionId: `node-${randomUUID()}`,
    });

    await assert.rejects(client.messages.create(PARAMS), (error) => error === lost);
    assert.equal(settlements.length, 0);
  });

  it('checks the session id and config once, at construction', () => {
    assert.throws(() => new JournaledAnthropic({ anthropic: standInProvider, spendgate, sessionId: 'no spaces' }), /sessionId/);
    assert.throws(
      () => new JournaledAnthropic({ anthropic: standInProvider, spendgate, sessionId: 's', enforcementConfig: { ceiling: 1 } }),
      /unknown key "ceiling"/,
    );
  });

  it('fingerprints a streamed and an unstreamed request alike', async () => {
    const sessionId = `node-${randomUUID()}`;
    const client = new JournaledAnthropic({
      anthropic: recordingProvider(),
      spendgate,
      sessionId,
      enforcementConfig: { dedup_ttl_seconds: 60 },
    });

    await client.messages.create(PARAMS);
    await assert.rejects(client.messages.create({ ...PARAMS, stream: false }), DuplicateRequest);
  });
});
