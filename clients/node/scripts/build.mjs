// Build the package from the contract: one script, so the steps cannot drift apart.
//
// 1. proto-loader-gen-types writes TypeScript types of the wire objects to
//    src/generated/ from ../../protos (never committed, so never stale);
// 2. tsc compiles src/ to dist/ (a renamed or retyped proto field fails here);
// 3. the .proto files are copied to dist/proto/, which the client loads at run
//    time, so the built package carries the exact contract it was typed against.
import { execFileSync } from 'node:child_process';
import { cpSync, rmSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const packageDir = join(dirname(fileURLToPath(import.meta.url)), '..');
const protoRoot = join(packageDir, '..', '..', 'protos');
const bin = (name) => join(packageDir, 'node_modules', '.bin', name);
const run = (command, args) => {
  try {
    execFileSync(command, args, { cwd: packageDir, stdio: 'inherit' });
  } catch (error) {
    process.exit(error.status ?? 1); // the tool has printed its own errors; a stack trace adds nothing
  }
};

rmSync(join(packageDir, 'dist'), { recursive: true, force: true });
rmSync(join(packageDir, 'src', 'generated'), { recursive: true, force: true });
// These flags must match LOADER_OPTIONS in src/wire.ts (the generated types describe that shape).
run(bin('proto-loader-gen-types'), [
  '--keepCase', '--longs=String', '--enums=String', '--defaults', '--oneofs',
  '--grpcLib=@grpc/grpc-js', '--importFileExtension=.js',
  '-I', protoRoot, '-O', 'src/generated', 'spendgate/v1/decision.proto',
]);
run(bin('tsc'), ['-p', 'tsconfig.json']);
cpSync(join(protoRoot, 'spendgate'), join(packageDir, 'dist', 'proto', 'spendgate'), {
  recursive: true,
  filter: (path) => statSync(path).isDirectory() || path.endsWith('.proto'),
});
