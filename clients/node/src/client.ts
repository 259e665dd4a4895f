// DecisionClient: one reused channel, a deadline per call, a fail mode.
import { setTimeout as sleep } from 'node:timers/promises';

import * as grpc from '@grpc/grpc-js';

import { type EnforcementConfigInput, type RuleKey, RULE_KEYS, enforcementConfigToWire } from './config.js';
import {
  BLOCK_ERRORS,
  EnforcementError,
  InvalidRequest,
  SpendgateError,
  SpendgateUnavailable,
} from './errors.js';
import {
  type DecideRequest,
  type DecideResponse,
  type DecisionServiceClient,
  type SettleRequest,
  type SettleResponse,
  fieldViolations,
  spendgateV1,
} from './wire.js';

export const DEFAULT_TARGET = '127.0.0.1:50051';

/** What to do when the service is unreachable or late: allow the call, or throw. */
export type FailMode = 'open' | 'closed';

/** The outcome of a decision, in the words of the config. */
export type VerdictKey = 'allow' | 'block' | 'allow_downgraded';

// The service is down or late: the fail mode decides. Anything else is the caller's problem.
const OUTAGE_CODES: ReadonlySet<grpc.status> = new Set([
  grpc.status.UNAVAILABLE,
  grpc.status.DEADLINE_EXCEEDED,
  grpc.status.INTERNAL,
  grpc.status.UNKNOWN,
  grpc.status.CANCELLED,
  grpc.status.RESOURCE_EXHAUSTED,
]);
const VERDICTS: Readonly<Record<string, VerdictKey>> = {
  VERDICT_ALLOW: 'allow',
  VERDICT_BLOCK: 'block',
  VERDICT_ALLOW_DOWNGRADED: 'allow_downgraded',
};
const SETTLE_ATTEMPTS = 3;
const SETTLE_BACKOFF_MILLIS = 50;

/** Where the client reports what it did on its own (fail-open allowances, lost settles). */
export interface Logger {
  warn(message: string): void;
}

/** Options of DecisionClient. */
export interface DecisionClientOptions {
  /** `host:port` or `dns:///name:port` (round-robin over every address); default env SPENDGATE_TARGET, else 127.0.0.1:50051. */
  target?: string;
  /** Deadline of each Decide, in milliseconds (Settle gets four times as long). */
  timeoutMillis?: number;
  /** `"open"` allows a call when the service is unreachable or late (logged and counted); `"closed"` throws SpendgateUnavailable. */
  failMode?: FailMode;
  /** spendgate API key, sent as `authorization: Bearer <key>`; default env SPENDGATE_API_KEY. */
  apiKey?: string;
  /** TLS channel credentials; plaintext when omitted. */
  credentials?: grpc.ChannelCredentials;
  /** Default: console. */
  logger?: Logger;
}

/** One provider call, before it is made. */
export interface DecideInput {
  /** The agent session: budgets, tool counts and dedup are per session. */
  sessionId: string;
  /** The model the caller asked for, as sent to the provider. */
  model: string;
  /** Estimated input tokens of the request (prompt, system, tools). */
  inputTokens: number;
  /** The request's max output tokens. */
  maxOutputTokens: number;
  /** A hash of the canonical request, 16-64 bytes (e.g. SHA-256). */
  fingerprint: Uint8Array;
  /** Tool results carried by this request. */
  toolCallCount?: number;
  /** Idempotency key: a retried Decide with the same id returns the same decision. */
  requestId?: string;
  /** Client-side limits; tighten-only. */
  enforcementConfig?: EnforcementConfigInput;
}

/** What the provider reported for an allowed call. */
export interface SettleInput {
  sessionId: string;
  /** Decision.reservationId. */
  reservationId: string;
  /** The model that actually ran (Decision.effectiveModel). */
  model: string;
  inputTokens?: number;
  outputTokens?: number;
  cacheReadInputTokens?: number;
  cacheWriteInputTokens?: number;
  /** False when the provider call failed before billing: the reservation is released. */
  providerOk?: boolean;
}

/**
 * The service's answer to one Decide. Money is integer nano-USD as bigint.
 *
 * `failOpen` is true when the service was unreachable and `failMode: "open"` allowed
 * the call without a decision (nothing was reserved, `reservationId` is empty).
 */
export class Decision {
  constructor(
    readonly verdict: VerdictKey,
    readonly effectiveModel: string,
    /** The rule that blocked or downgraded the call (its config key), else null. */
    readonly rule: RuleKey | null,
    readonly reason: string,
    readonly decisionId: string,
    /** Pass to settle(); empty when blocked or failed open. */
    readonly reservationId: string,
    readonly estimatedCostNanoUsd: bigint,
    readonly sessionSpendNanoUsd: bigint,
    /** Null when no session budget applies. */
    readonly remainingBudgetNanoUsd: bigint | null,
    readonly configVersion: number,
    readonly wouldBlock: boolean,
    readonly shadowRules: readonly string[],
    readonly failOpen = false,
  ) {
    Object.freeze(this);
  }

  /** The call may go to the provider (on `effectiveModel`). */
  get allowed(): boolean {
    return this.verdict !== 'block';
  }

  /** Throw the typed EnforcementError of the rule that blocked; do nothing if allowed. */
  raiseForBlock(): void {
    if (this.allowed) {
      return;
    }
    const ErrorType = (this.rule !== null ? BLOCK_ERRORS[this.rule] : undefined) ?? EnforcementError;
    throw new ErrorType(this.reason, this.decisionId, this.rule);
  }
}

/** What the service counted for a settled call. */
export interface Settlement {
  readonly costNanoUsd: bigint;
  readonly sessionSpendNanoUsd: bigint;
  /** True when this reservation had been settled before (nothing changed). */
  readonly alreadySettled: boolean;
}

/** Counters of what the client did on its own. */
export class ClientStats {
  decisions = 0;
  failOpenAllowances = 0;
  settleRetries = 0;
  settleFailures = 0;

  /** The counters as a plain object. */
  snapshot(): Record<'decisions' | 'failOpenAllowances' | 'settleRetries' | 'settleFailures', number> {
    const { decisions, failOpenAllowances, settleRetries, settleFailures } = this;
    return { decisions, failOpenAllowances, settleRetries, settleFailures };
  }
}

function toDecision(response: DecideResponse): Decision {
  const ruleKey = (name: string): RuleKey | undefined => RULE_KEYS[name as keyof typeof RULE_KEYS];
  return new Decision(
    VERDICTS[response.verdict] ?? 'block', // a verdict this client does not know is not an allow
    response.effective_model,
    ruleKey(response.rule) ?? null,
    response.reason,
    response.decision_id,
    response.reservation_id,
    BigInt(response.estimated_cost_nano_usd),
    BigInt(response.session_spend_nano_usd),
    response.remaining_budget_nano_usd === undefined ? null : BigInt(response.remaining_budget_nano_usd),
    Number(response.config_version),
    response.would_block,
    Object.freeze(response.shadow_rules.map((rule) => ruleKey(rule) ?? String(rule))),
  );
}

function isServiceError(error: unknown): error is grpc.ServiceError {
  return error instanceof Error && typeof (error as Partial<grpc.ServiceError>).code === 'number';
}

function callerError(error: grpc.ServiceError): SpendgateError {
  const message = `${grpc.status[error.code]}: ${error.details}`;
  if (error.code === grpc.status.INVALID_ARGUMENT || error.code === grpc.status.NOT_FOUND) {
    return new InvalidRequest(message, fieldViolations(error), { cause: error });
  }
  return new SpendgateError(message, { cause: error });
}

function channelOptions(target: string): grpc.ChannelOptions {
  const options: grpc.ChannelOptions = {
    // Retry-free hot path: a late answer is handled by the fail mode, not retried.
    'grpc.enable_retries': 0,
    'grpc.keepalive_time_ms': 30_000,
    'grpc.keepalive_timeout_ms': 5_000,
    'grpc.keepalive_permit_without_calls': 1,
  };
  if (target.startsWith('dns:')) {
    // Spread calls over every pod behind a headless Service.
    options['grpc.service_config'] = JSON.stringify({ loadBalancingConfig: [{ round_robin: {} }] });
  }
  return options;
}

/**
 * Client of spendgate.v1.DecisionService. Share one per process: it keeps one channel.
 *
 * @example
 * const spendgate = new DecisionClient({ failMode: 'closed', timeoutMillis: 250 });
 * const decision = await spendgate.decide({ sessionId, model, inputTokens, maxOutputTokens, fingerprint });
 * decision.raiseForBlock();
 */
export class DecisionClient {
  readonly target: string;
  readonly timeoutMillis: number;
  readonly failMode: FailMode;
  readonly stats = new ClientStats();
  readonly #stub: DecisionServiceClient;
  readonly #metadata: grpc.Metadata;
  readonly #logger: Logger;

  constructor(options: DecisionClientOptions = {}) {
    const { timeoutMillis = 250, failMode = 'open' } = options;
    if (failMode !== 'open' && failMode !== 'closed') {
      throw new RangeError(`failMode must be "open" or "closed", got ${JSON.stringify(failMode)}`);
    }
    if (!(typeof timeoutMillis === 'number' && timeoutMillis > 0 && Number.isFinite(timeoutMillis))) {
      throw new RangeError(`timeoutMillis must be a positive number of milliseconds, got ${String(timeoutMillis)}`);
    }
    this.target = options.target || process.env['SPENDGATE_TARGET'] || DEFAULT_TARGET;
    this.timeoutMillis = timeoutMillis;
    this.failMode = failMode;
    this.#logger = options.logger ?? console;
    this.#metadata = new grpc.Metadata();
    const apiKey = options.apiKey ?? process.env['SPENDGATE_API_KEY'];
    if (apiKey) {
      this.#metadata.set('authorization', `Bearer ${apiKey}`);
    }
    const { DecisionService } = spendgateV1();
    this.#stub = new DecisionService(
      this.target,
      options.credentials ?? grpc.credentials.createInsecure(),
      channelOptions(this.target),
    );
  }

  /**
   * Ask whether a provider call may go ahead. A block is returned, not thrown:
   * call `raiseForBlock()` on the result for the typed error.
   *
   * @throws SpendgateUnavailable the service is unreachable or late and failMode is "closed".
   * @throws InvalidRequest the request is malformed (names the field).
   * @throws TypeError enforcementConfig has an unknown key or a value of the wrong type.
   */
  async decide(input: DecideInput): Promise<Decision> {
    const request: DecideRequest = {
      session_id: input.sessionId,
      model: input.model,
      input_tokens: input.inputTokens,
      max_output_tokens: input.maxOutputTokens,
      fingerprint: input.fingerprint,
      tool_call_count: input.toolCallCount ?? 0,
      request_id: input.requestId ?? '',
    };
    if (input.enforcementConfig !== undefined) {
      request.enforcement_config = enforcementConfigToWire(input.enforcementConfig);
    }
    this.stats.decisions += 1;
    let response: DecideResponse;
    try {
      response = await this.#call('Decide', request, this.timeoutMillis);
    } catch (error) {
      if (!isServiceError(error)) {
        throw error;
      }
      if (!OUTAGE_CODES.has(error.code)) {
        throw callerError(error);
      }
      const code = grpc.status[error.code];
      if (this.failMode === 'closed') {
        throw new SpendgateUnavailable(
          `spendgate at ${this.target} did not answer (${code}); failMode is "closed"`,
          { cause: error },
        );
      }
      this.stats.failOpenAllowances += 1;
      this.#logger.warn(`spendgate unreachable (${code}); failMode "open" allows the call`);
      return new Decision('allow', input.model, null, `fail open: spendgate ${code}`, '', '', 0n, 0n, null, 0, false, [], true);
    }
    return toDecision(response);
  }

  /**
   * Report a call's real usage. Retried (Settle is idempotent); never throws on an outage.
   *
   * @returns null when the service stayed unreachable: the reservation then expires and
   *   is counted at its estimate, which errs on the side of the budget.
   * @throws InvalidRequest the reservation is unknown or a field is malformed.
   */
  async settle(input: SettleInput): Promise<Settlement | null> {
    const request: SettleRequest = {
      session_id: input.sessionId,
      reservation_id: input.reservationId,
      model: input.model,
      usage: {
        input_tokens: input.inputTokens ?? 0,
        output_tokens: input.outputTokens ?? 0,
        cache_read_input_tokens: input.cacheReadInputTokens ?? 0,
        cache_write_input_tokens: input.cacheWriteInputTokens ?? 0,
      },
      outcome: input.providerOk === false ? 'PROVIDER_OUTCOME_ERROR' : 'PROVIDER_OUTCOME_OK',
    };
    for (let attempt = 0; attempt < SETTLE_ATTEMPTS; attempt += 1) {
      let response: SettleResponse;
      try {
        response = await this.#call('Settle', request, this.timeoutMillis * 4);
      } catch (error) {
        if (!isServiceError(error)) {
          throw error;
        }
        if (!OUTAGE_CODES.has(error.code)) {
          throw callerError(error);
        }
        if (attempt + 1 < SETTLE_ATTEMPTS) {
          this.stats.settleRetries += 1;
          await sleep(SETTLE_BACKOFF_MILLIS * 2 ** attempt);
        }
        continue;
      }
      return {
        costNanoUsd: BigInt(response.actual_cost_nano_usd),
        sessionSpendNanoUsd: BigInt(response.session_spend_nano_usd),
        alreadySettled: response.already_settled,
      };
    }
    this.stats.settleFailures += 1;
    this.#logger.warn(`spendgate settle of ${input.reservationId} failed; it will count at its estimate`);
    return null;
  }

  /** Close the channel; calls in flight fail with CANCELLED. */
  close(): void {
    this.#stub.close();
  }

  #call(method: 'Decide', request: DecideRequest, timeoutMillis: number): Promise<DecideResponse>;
  #call(method: 'Settle', request: SettleRequest, timeoutMillis: number): Promise<SettleResponse>;
  #call(method: 'Decide' | 'Settle', request: DecideRequest | SettleRequest, timeoutMillis: number): Promise<unknown> {
    const options: grpc.CallOptions = { deadline: Date.now() + timeoutMillis };
    return new Promise((resolve, reject) => {
      const done = (error: grpc.ServiceError | null, response?: unknown): void =>
        error ? reject(error) : resolve(response);
      if (method === 'Decide') {
        this.#stub.Decide(request as DecideRequest, this.#metadata, options, done);
      } else {
        this.#stub.Settle(request as SettleRequest, this.#metadata, options, done);
      }
    });
  }
}
