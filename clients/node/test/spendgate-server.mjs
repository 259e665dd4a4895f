// A real `spendgate serve` for tests: free port (port 0, read back from the JSON
// "serving" log line on stderr), memory store, stopped by PID.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const STARTUP_MILLIS = 20_000;
const STOP_MILLIS = 10_000;

/** The spendgate CLI: env SPENDGATE_BIN, else the repo's .venv (made by `make venv`). */
export const SPENDGATE_BIN = process.env.SPENDGATE_BIN || join(REPO_ROOT, '.venv', 'bin', 'spendgate');

/**
 * Start `spendgate serve` with `config` ({enforcement, prices}) as its --config file.
 *
 * @returns {Promise<{ target: string, pid: number, logLines: string[], stop(): Promise<void> }>}
 */
export async function startSpendgate(config = {}) {
  if (!existsSync(SPENDGATE_BIN)) {
    throw new Error(`${SPENDGATE_BIN} does not exist: run 'make venv' or set SPENDGATE_BIN`);
  }
  const workdir = mkdtempSync(join(tmpdir(), 'sg-node-'));
  const configPath = join(workdir, 'spendgate.json');
  writeFileSync(configPath, JSON.stringify(config));
  const child = spawn(
    SPENDGATE_BIN,
    ['serve', '--port', '0', '--metrics-port', '0', '--log-format', 'json', '--drain-seconds', '0', '--config', configPath],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  // If the test process dies first, do not leave the server behind.
  const reap = () => child.kill('SIGKILL');
  process.once('exit', reap);
  const exited = new Promise((resolveExit) => child.once('exit', (code, signal) => resolveExit({ code, signal })));
  const logLines = [];
  const lines = createInterface({ input: child.stderr }); // read to the end, so the pipe never fills

  let port;
  try {
    port = await new Promise((resolvePort, reject) => {
      let serving = false;
      const timer = setTimeout(() => reject(new Error('spendgate did not report serving')), STARTUP_MILLIS);
      lines.on('line', (line) => {
        logLines.push(line);
        if (!serving && line.startsWith('{')) {
          const event = JSON.parse(line);
          if (event.event === 'serving') {
            serving = true;
            clearTimeout(timer);
            resolvePort(event.port);
          }
        }
      });
      exited.then(({ code, signal }) => {
        clearTimeout(timer);
        reject(new Error(`spendgate exited (${code ?? signal})`));
      });
    });
  } catch (error) {
    child.kill('SIGKILL');
    process.off('exit', reap);
    rmSync(workdir, { recursive: true, force: true });
    throw new Error(`${error.message}:\n${logLines.join('\n')}`);
  }

  return {
    target: `127.0.0.1:${port}`,
    pid: child.pid,
    logLines,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        process.kill(child.pid, 'SIGTERM');
        const timer = setTimeout(() => process.kill(child.pid, 'SIGKILL'), STOP_MILLIS);
        await exited;
        clearTimeout(timer);
      }
      process.off('exit', reap);
      rmSync(workdir, { recursive: true, force: true });
    },
  };
}
