#!/usr/bin/env node
// A solc command-line stand-in backed by solc-js (the npm `solc` package, WebAssembly), for
// `forge build --use contracts/tools/solc` where no native solc can be downloaded.
//
// forge needs two things from a compiler binary:
//   solc --version            -> last non-empty line "Version: <semver>"
//   solc [--base-path P] [--include-path P] [--allow-paths P] --standard-json
//                             -> Standard JSON input on stdin, Standard JSON output on stdout
// forge reads every source itself and passes the contents in the input, so the file-system
// options are accepted and ignored; an import that still needs resolving is read relative to the
// given base/include paths (the same lookup native solc does).
'use strict';

const fs = require('fs');
const path = require('path');

function loadSolc() {
  // Resolve `solc` from the repository's node_modules whatever the caller's working directory.
  const here = path.resolve(__dirname, '..', '..');
  try {
    return require(require.resolve('solc', { paths: [here, process.cwd()] }));
  } catch (err) {
    process.stderr.write(`solc-js wrapper: cannot load the npm package "solc" (run npm install): ${err.message}\n`);
    process.exit(1);
  }
}

function main(argv) {
  const solc = loadSolc();
  if (argv.includes('--version') || argv.includes('-v')) {
    // foundry-compilers parses the last non-empty line, minus "Version: "
    process.stdout.write('solc, the solidity compiler commandline interface\n');
    process.stdout.write(`Version: ${solc.version()}\n`);
    return 0;
  }
  if (!argv.includes('--standard-json')) {
    process.stderr.write('solc-js wrapper: only --version and --standard-json are supported\n');
    return 2;
  }
  const roots = [process.cwd()];
  for (let i = 0; i < argv.length - 1; i++) {
    if (argv[i] === '--base-path' || argv[i] === '--include-path') roots.push(path.resolve(argv[i + 1]));
  }
  function findImports(name) {
    for (const root of [...roots].reverse()) {
      const file = path.isAbsolute(name) ? name : path.join(root, name);
      try {
        return { contents: fs.readFileSync(file, 'utf8') };
      } catch (_) { /* try the next root */ }
    }
    return { error: `File not found: ${name}` };
  }
  const input = fs.readFileSync(0, 'utf8');
  const output = solc.compile(input, { import: findImports });
  process.stdout.write(output);
  return 0;
}

process.exitCode = main(process.argv.slice(2));
