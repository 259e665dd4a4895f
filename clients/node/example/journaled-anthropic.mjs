// Wrap a provider call the way the Python wrappers (JournaledAnthropic) do:
// Decide before the call, never contact the provider when blocked, run on the
// model spendgate chose, Settle the real usage after; release the reservation when
// the provider refused the call, and leave it to expire at its estimate when the
// outcome is unknown (a timeout may still have been billed).
//
//   node example/journaled-anthropic.mjs        # needs `spendgate serve` on SPENDGATE_TARGET
//
// With ANTHROPIC_API_KEY set and `@anthropic-ai/sdk` installed it calls Anthropic;
// otherwise a stand-in provider with the same `messages.create` shape answers.
import { createHash } from 'node:crypto';
import { pathToFileURL } from 'node:url';

import { DecisionClient, EnforcementError, enforcementConfigToWire } from '@spendgate/client';

const SESSION_ID = /^[A-Za-z0-9._:@/+=-]{1,128}$/;
const BYTES_PER_TOKEN = 3; // errs high for prose, as the Python estimate does
const TRANSPORT_KEYS = new Set(['stream', 'stream_options']); // streamed or not, the same request

/** JSON with sorted keys and no whitespace: the same request always gives the same bytes. */
function canonicalJson(value) {
  if (Array.isArray(value)) {
    return `[${value.map(canonicalJson).join(',')}]`;
  }
  if (value !== null && typeof value === 'object') {
    const keys = Object.keys(value).filter((key) => value[key] !== undefined).sort();
    return `{${keys.map((key) => `${JSON.stringify(key)}:${canonicalJson(value[key])}`).join(',')}}`;
  }
  return JSON.stringify(value);
}

/** The request body as Decide sees it: canonical JSON without the transport keys. */
function canonicalRequest(params) {
  return canonicalJson(Object.fromEntries(Object.entries(params).filter(([key]) => !TRANSPORT_KEYS.has(key))));
}

/**
 * A rough input-token estimate: UTF-8 bytes / 3. The Python client's estimate
 * (clients/python, _estimate.py) also counts media and tool definitions at fixed sizes.
 */
function estimateInputTokens(canonical) {
  return Math.ceil(Buffer.byteLength(canonical) / BYTES_PER_TOKEN);
}

/** Tool results carried by this request: tool_result blocks in the last user turn. */
function countToolResults(messages) {
  const last = messages.at(-1);
  if (last?.role !== 'user' || !Array.isArray(last.content)) {
    return 0;
  }
  return last.content.filter((block) => block.type === 'tool_result').length;
}

/**
 * An Anthropic client whose `messages.create` asks spendgate first.
 *
 * A blocked call throws the rule's EnforcementError subclass (TokenCeilingExceeded,
 * SessionBudgetExceeded, DuplicateRequest, ToolCallLimitExceeded) and the provider
 * is not contacted, so it is never billed.
 */
export class JournaledAnthropic {
  /**
   * @param {object} options
   * @param {{ messages: { create(params: object): Promise<any> } }} options.anthropic the provider SDK client
   * @param {DecisionClient} options.spendgate one shared DecisionClient
   * @param {string} options.sessionId the agent session budgets and limits apply to
   * @param {import('@spendgate/client').EnforcementConfigInput} [options.enforcementConfig] tighten-only limits
   */
  constructor({ anthropic, spendgate, sessionId, enforcementConfig }) {
    // Checked once, here, so a typo fails at construction rather than on the first call.
    if (!SESSION_ID.test(sessionId)) {
      throw new TypeError(`sessionId must be 1-128 characters of [A-Za-z0-9._:@/+=-], got ${JSON.stringify(sessionId)}`);
    }
    if (enforcementConfig) {
      enforcementConfigToWire(enforcementConfig);
    }
    this.anthropic = anthropic;
    this.spendgate = spendgate;
    this.sessionId = sessionId;
    this.enforcementConfig = enforcementConfig;
    this.messages = { create: (params) => this.#create(params) };
  }

  async #create(params) {
    const canonical = canonicalRequest(params);
    const decision = await this.spendgate.decide({
      sessionId: this.sessionId,
      model: params.model,
      inputTokens: estimateInputTokens(canonical),
      maxOutputTokens: params.max_tokens,
      fingerprint: createHash('sha256').update(canonical).digest(),
      toolCallCount: countToolResults(params.messages),
      ...(this.enforcementConfig && { enforcementConfig: this.enforcementConfig }),
    });
    decision.raiseForBlock();
    if (decision.wouldBlock) {
      console.warn(`spendgate shadow mode: session ${this.sessionId} would have been blocked (${decision.reason})`);
    }
    // A fail-open decision reserved nothing, so there is nothing to settle.
    const settle = decision.reservationId
      ? (fields) => this.spendgate.settle({
          sessionId: this.sessionId,
          reservationId: decision.reservationId,
          model: decision.effectiveModel,
          ...fields,
        })
      : async () => null;
    let response;
    try {
      response = await this.anthropic.messages.create({ ...params, model: decision.effectiveModel });
    } catch (error) {
      // The SDK's APIError carries the HTTP status: the provider answered and refused,
      // so nothing was billed. Anything else (timeout, lost connection) may have been
      // billed: the reservation expires and counts at its estimate.
      if (typeof error?.status === 'number') {
        await settle({ providerOk: false });
      }
      throw error;
    }
    const usage = response.usage ?? {};
    await settle({
      inputTokens: usage.input_tokens ?? 0,
      outputTokens: usage.output_tokens ?? 0,
      cacheReadInputTokens: usage.cache_read_input_tokens ?? 0,
      cacheWriteInputTokens: usage.cache_creation_input_tokens ?? 0,
    });
    return response;
  }
}

/** Same shape as the SDK's client; answers without a network. */
export const standInProvider = {
  messages: {
    async create(params) {
      return {
        model: params.model,
        content: [{ type: 'text', text: 'hello from the stand-in provider' }],
        usage: { input_tokens: 12, output_tokens: 8 },
      };
    },
  },
};

async function providerClient() {
  if (!process.env.ANTHROPIC_API_KEY) {
    return standInProvider;
  }
  try {
    const { default: Anthropic } = await import('@anthropic-ai/sdk');
    return new Anthropic();
  } catch {
    return standInProvider;
  }
}

async function main() {
  const spendgate = new DecisionClient({ failMode: 'closed', timeoutMillis: 1000 });
  const client = new JournaledAnthropic({
    anthropic: await providerClient(),
    spendgate,
    sessionId: `example-${process.pid}`,
    enforcementConfig: { token_ceiling: 8000, max_session_usd: 0.5 },
  });
  try {
    const reply = await client.messages.create({
      model: 'claude-sonnet-4-5',
      max_tokens: 256,
      messages: [{ role: 'user', content: 'Say hello.' }],
    });
    console.log(reply.model, reply.content[0]?.text);
  } catch (error) {
    if (!(error instanceof EnforcementError)) {
      throw error;
    }
    console.log(`blocked by ${error.rule}: ${error.reason} (decision ${error.decisionId})`);
  } finally {
    spendgate.close();
  }
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  await main();
}
