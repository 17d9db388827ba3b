#!/usr/bin/env node
// Exports the deployable contracts' ABI + bytecode from forge's out/ into the one place Python loads
// them from (node/chain/artifacts/<Contract>.json), or, with --check, verifies the committed files
// equal a fresh export (so `make test` fails when sources changed but artifacts were not rebuilt).
//
//   node tools/export-artifacts.cjs --out DIR     write DIR/<Contract>.json
//   node tools/export-artifacts.cjs --check DIR   exit 1 when DIR differs from a fresh export
//
// Each file also carries `sourceHash`: sha256 over the contract sources and the pinned solc /
// OpenZeppelin versions, so Python can detect stale artifacts without running forge (compiler settings
// in foundry.toml are covered by --check, which compares a fresh export byte for byte).
'use strict';

const fs = require('fs');
const path = require('path');
const crypto = require('crypto');

const CONTRACTS = ['DatanetRegistry', 'AdapterRegistry', 'NodeRegistry', 'UsageSettlement', 'TestToken'];
const HERE = path.resolve(__dirname, '..'); // contracts/
const ROOT = path.resolve(HERE, '..');

function listSol(dir) {
  const out = [];
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, entry.name);
    if (entry.isDirectory()) out.push(...listSol(p));
    else if (entry.name.endsWith('.sol')) out.push(p);
  }
  return out;
}

// Keep in step with node/chain/artifacts.py:source_hash().
function sourceHash() {
  const h = crypto.createHash('sha256');
  const files = listSol(path.join(HERE, 'src'));
  const rel = files.map((f) => path.relative(ROOT, f).split(path.sep).join('/')).sort();
  for (const r of rel) {
    h.update(r + '\n');
    h.update(fs.readFileSync(path.join(ROOT, r)));
    h.update('\n');
  }
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8'));
  const deps = Object.assign({}, pkg.dependencies, pkg.devDependencies);
  h.update(`solc@${deps['solc']}\n@openzeppelin/contracts@${deps['@openzeppelin/contracts']}\n`);
  return h.digest('hex');
}

function exportOne(name, hash) {
  const file = path.join(HERE, 'out', `${name}.sol`, `${name}.json`);
  if (!fs.existsSync(file)) throw new Error(`${file} missing: run forge build first`);
  const art = JSON.parse(fs.readFileSync(file, 'utf8'));
  const meta = art.metadata || {};
  const settings = meta.settings || {};
  return {
    contractName: name,
    sourceName: `contracts/src/${name}.sol`,
    compiler: {
      version: (meta.compiler || {}).version,
      evmVersion: settings.evmVersion,
      optimizer: settings.optimizer,
    },
    sourceHash: hash,
    abi: art.abi,
    bytecode: art.bytecode.object,
  };
}

function render(obj) {
  return JSON.stringify(obj, null, 1) + '\n';
}

function main(argv) {
  const mode = argv[0];
  const dir = argv[1];
  if (!['--out', '--check'].includes(mode) || !dir) {
    process.stderr.write('usage: export-artifacts.cjs --out DIR | --check DIR\n');
    return 2;
  }
  const hash = sourceHash();
  const wanted = Object.fromEntries(CONTRACTS.map((n) => [n, render(exportOne(n, hash))]));
  if (mode === '--out') {
    fs.mkdirSync(dir, { recursive: true });
    for (const [name, text] of Object.entries(wanted)) fs.writeFileSync(path.join(dir, `${name}.json`), text);
    process.stdout.write(`exported ${CONTRACTS.length} artifacts to ${path.relative(process.cwd(), dir) || dir}\n`);
    return 0;
  }
  const stale = [];
  for (const [name, text] of Object.entries(wanted)) {
    const f = path.join(dir, `${name}.json`);
    if (!fs.existsSync(f) || fs.readFileSync(f, 'utf8') !== text) stale.push(name);
  }
  if (stale.length) {
    process.stderr.write(
      `artifacts out of date for ${stale.join(', ')}: run \`make -C contracts build\` and commit node/chain/artifacts\n`,
    );
    return 1;
  }
  process.stdout.write(`artifacts up to date (${CONTRACTS.length} contracts)\n`);
  return 0;
}

process.exitCode = main(process.argv.slice(2));
